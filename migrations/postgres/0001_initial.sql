-- Initial control-plane schema (PostgreSQL). Keep in step with ../sqlite/0001_initial.sql.

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    default_team_id TEXT NOT NULL,
    is_platform_admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE memberships (
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX memberships_user ON memberships(user_id);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    created_by TEXT REFERENCES users(id) ON DELETE SET NULL,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_team ON api_keys(team_id, created_at);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('ready', 'draining', 'lost')),
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    last_heartbeat_at BIGINT,
    created_at BIGINT NOT NULL
);

CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    team_id TEXT REFERENCES teams(id) ON DELETE CASCADE,
    alias TEXT UNIQUE,
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    template_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('creating', 'running', 'paused', 'killed', 'lost')),
    metadata TEXT NOT NULL,
    env_var_names TEXT NOT NULL,
    host_id TEXT REFERENCES hosts(id) ON DELETE SET NULL,
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    envd_access_token TEXT,
    auto_pause BIGINT NOT NULL,
    allow_internet BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL,
    ended_at BIGINT
);
CREATE INDEX sandboxes_team_created ON sandboxes(team_id, created_at, id);
CREATE INDEX sandboxes_state_end ON sandboxes(state, end_at);

-- One row per metadata pair, so that filters are exact equality on indexed columns rather
-- than pattern matches inside a JSON string.
CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
);
CREATE INDEX sandbox_metadata_kv ON sandbox_metadata(key, value);

CREATE TABLE idempotency_keys (
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    -- NULL while the first request holding the key is still being served.
    sandbox_id TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, key)
);

CREATE TABLE audit_log (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    team_id TEXT,
    actor_kind TEXT NOT NULL CHECK (actor_kind IN ('user', 'api_key', 'system')),
    actor_id TEXT,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT,
    details TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX audit_log_team ON audit_log(team_id, id);

-- The public templates every installation offers (built by the image pipeline).
INSERT INTO templates (id, team_id, alias, cpu_count, memory_mb, disk_size_mb, envd_version, created_at)
VALUES ('base', NULL, 'base', 2, 512, 2048, '0.6.4', 0),
       ('code-interpreter-v1', NULL, 'code-interpreter-v1', 2, 1024, 2048, '0.6.4', 0);
