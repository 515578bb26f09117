-- Tables of the Persistence Service for MySQL 8.0+ and MariaDB 10.6+.
-- The service runs these statements itself at start (database.create_tables)
-- and in `flask --app wsgi init-db`; DBAs may run this file by hand instead:
--   mysql ai_terminal < persistence/store/sql/mysql.sql
-- Key columns use utf8mb4_bin so that keys compare exactly as the service's
-- buffer compares them (the API refuses keys with surrounding whitespace).
-- ingest_seq is the service's arrival stamp of the row's newest record
-- (microseconds since the epoch): an update with an older stamp never
-- overwrites a newer one, whichever process or retry writes it.

CREATE TABLE IF NOT EXISTS translation_sessions (
    session_id       VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    filename         VARCHAR(255) NOT NULL,
    file_path        VARCHAR(512) NOT NULL,
    status           VARCHAR(20) NOT NULL DEFAULT 'pending',
    game_info        JSON NULL,
    llm_provider     VARCHAR(50) NOT NULL,
    metadata         JSON NULL,
    total_tasks      INT DEFAULT 0,
    completed_tasks  INT DEFAULT 0,
    failed_tasks     INT DEFAULT 0,
    processing_tasks INT DEFAULT 0,
    ingest_seq       BIGINT NOT NULL DEFAULT 0,
    created_at       TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at       TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (session_id),
    KEY idx_sessions_status (status),
    KEY idx_sessions_created_at (created_at),
    KEY idx_sessions_llm_provider (llm_provider)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS translation_tasks (
    task_id       VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    session_id    VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    batch_id      VARCHAR(64) NOT NULL,
    sheet_name    VARCHAR(255) NOT NULL,
    row_index     INT NOT NULL,
    column_name   VARCHAR(255) NOT NULL,
    source_text   TEXT NOT NULL,
    target_text   TEXT NULL,
    context       TEXT NULL,
    status        VARCHAR(20) NOT NULL DEFAULT 'pending',
    confidence    DECIMAL(5,4) NULL,
    error_message TEXT NULL,
    retry_count   INT DEFAULT 0,
    start_time    TIMESTAMP NULL DEFAULT NULL,
    end_time      TIMESTAMP NULL DEFAULT NULL,
    duration_ms   INT NULL,
    ingest_seq    BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (task_id),
    KEY idx_tasks_session_id (session_id),
    KEY idx_tasks_batch_id (batch_id),
    KEY idx_tasks_status (status),
    KEY idx_tasks_sheet_row (sheet_name, row_index),
    CONSTRAINT fk_tasks_session FOREIGN KEY (session_id)
        REFERENCES translation_sessions (session_id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS persistence_dead_letters (
    id              BIGINT NOT NULL AUTO_INCREMENT,
    record_type     VARCHAR(16) NOT NULL,
    record_key      VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    payload         LONGTEXT NOT NULL,
    error_code      INT NULL,
    error_message   TEXT NOT NULL,
    attempts        INT NOT NULL DEFAULT 1,
    first_failed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    last_failed_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    UNIQUE KEY uq_dead_letters_record (record_type, record_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
