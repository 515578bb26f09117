-- Tables of the Persistence Service for the embedded SQLite database.
-- Same columns and upsert rules as mysql.sql; times are UTC text
-- ('YYYY-MM-DD HH:MM:SS'), JSON columns hold JSON text.

CREATE TABLE IF NOT EXISTS translation_sessions (
    session_id       TEXT NOT NULL PRIMARY KEY,
    filename         TEXT NOT NULL,
    file_path        TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    game_info        TEXT NULL,
    llm_provider     TEXT NOT NULL,
    metadata         TEXT NULL,
    total_tasks      INTEGER DEFAULT 0,
    completed_tasks  INTEGER DEFAULT 0,
    failed_tasks     INTEGER DEFAULT 0,
    processing_tasks INTEGER DEFAULT 0,
    ingest_seq       INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at       TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_sessions_status ON translation_sessions (status);
CREATE INDEX IF NOT EXISTS idx_sessions_created_at ON translation_sessions (created_at);
CREATE INDEX IF NOT EXISTS idx_sessions_llm_provider ON translation_sessions (llm_provider);

CREATE TABLE IF NOT EXISTS translation_tasks (
    task_id       TEXT NOT NULL PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES translation_sessions (session_id) ON DELETE CASCADE,
    batch_id      TEXT NOT NULL,
    sheet_name    TEXT NOT NULL,
    row_index     INTEGER NOT NULL,
    column_name   TEXT NOT NULL,
    source_text   TEXT NOT NULL,
    target_text   TEXT NULL,
    context       TEXT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    confidence    REAL NULL,
    error_message TEXT NULL,
    retry_count   INTEGER DEFAULT 0,
    start_time    TEXT NULL,
    end_time      TEXT NULL,
    duration_ms   INTEGER NULL,
    ingest_seq    INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at    TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_tasks_session_id ON translation_tasks (session_id);
CREATE INDEX IF NOT EXISTS idx_tasks_batch_id ON translation_tasks (batch_id);
CREATE INDEX IF NOT EXISTS idx_tasks_status ON translation_tasks (status);
CREATE INDEX IF NOT EXISTS idx_tasks_sheet_row ON translation_tasks (sheet_name, row_index);

CREATE TABLE IF NOT EXISTS persistence_dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    record_type     TEXT NOT NULL,
    record_key      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    error_code      INTEGER NULL,
    error_message   TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 1,
    first_failed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    last_failed_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (record_type, record_key)
);
