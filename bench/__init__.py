"""Benchmark harness of the Persistence Service: ``python -m bench`` (see docs/PERFORMANCE.md).

It measures the service against physical floors measured in the same run:

- ``http-floor``: a parse-only WSGI app under the same gunicorn settings (the most any
  Flask/gunicorn intake could reach on this machine), and the load generator's own limit;
- ``db-floor``: raw PyMySQL ``executemany`` of the service's own upsert SQL;
- ``intake``, ``flush``, ``e2e``, ``coalescing``, ``latency``, ``memory``: the service
  itself, each reported as a ratio to its floor or to its goal;
- ``cpu``: each step of the intake in one thread, without HTTP;
- ``tuning`` and ``bigtable`` (only when named): thread, worker and flush settings
  compared; the flush on a table that already holds a million rows.

Modules, by role:

========================  ==========================================================
``workload``              realistic session and task records, and request bodies
``loadgen``               the multi-process HTTP load generator
``servers``               starting and stopping gunicorn; worker pid, CPU and RSS
``floor_app``             the parse-only Flask app (the HTTP floor)
``databases``             bench databases (created and dropped per run), raw writes
``context``               what the sections share; the sizes of a run (``--quick``)
``measure_http``          HTTP floor, the client check, intake (interleaved)
``measure_db``            database floor and the service's own flusher
``measure_service``       end to end, coalescing, latency during a flush, memory
``measure_tuning``        threads, workers and flush settings compared (opt-in ``tuning``)
``measure_cpu``           the CPU of each intake step, one thread, no HTTP
``profile_http``          py-spy on the service's worker under load (run on its own)
``report``                goals, the table, results.json and the plot
``runner``                options, the order of the sections, clean-up
========================  ==========================================================
"""
