-- The service's tables. Applied once by `python -m services.migrate`, recorded in schema_migrations.

-- One row per task id that had an effect: the claim that makes duplicate deliveries harmless.
CREATE TABLE task_effects (
    task_id    text PRIMARY KEY,
    task_name  text NOT NULL,
    queue      text NOT NULL DEFAULT '',
    hostname   text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX task_effects_created_at ON task_effects (created_at);

-- Application sessions; tasks.cleanup.cleanup_expired_sessions deletes the expired ones.
CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    user_id    text,
    data       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);

-- One row per UTC day: the day's task outcomes, aggregated by tasks.reports.generate_daily_reports.
CREATE TABLE daily_reports (
    report_date  date PRIMARY KEY,
    total        integer NOT NULL,
    by_task      jsonb NOT NULL,
    by_queue     jsonb NOT NULL,
    generated_at timestamptz NOT NULL DEFAULT now(),
    task_id      text NOT NULL
);

-- Results of tasks.monitoring.health_check.
CREATE TABLE health_checks (
    task_id     text PRIMARY KEY,
    checked_at  timestamptz NOT NULL DEFAULT now(),
    hostname    text NOT NULL,
    healthy     boolean NOT NULL,
    details     jsonb NOT NULL
);
CREATE INDEX health_checks_checked_at ON health_checks (checked_at);
