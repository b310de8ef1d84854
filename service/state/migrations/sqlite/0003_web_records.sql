-- The web side's records (service/users.py, service/audit_log.py, service/flag_reviews.py):
-- accounts, who looked at or acknowledged what, and reviews of flags. Rows hold no patient data.
-- IF NOT EXISTS: befund main at 5027b3e created these tables on the fly, before migrations;
-- a state DB it made is adopted here as it is. "user" is quoted: PostgreSQL reserves the word.
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    "user" TEXT NOT NULL, role TEXT NOT NULL,
    action TEXT NOT NULL,
    study_uid TEXT,
    detail TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log(at);
CREATE INDEX IF NOT EXISTS audit_log_study ON audit_log(study_uid);
CREATE TABLE IF NOT EXISTS flag_reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT, model_version TEXT, run INTEGER,
    "user" TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_reviews_study ON flag_reviews(study_uid);
