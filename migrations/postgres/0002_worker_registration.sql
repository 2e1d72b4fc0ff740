-- Worker registration and the control channel (postgres). Keep in step with ../sqlite/0002_worker_registration.sql.

-- A registered worker's host: the SHA-256 of the client certificate control issued to it
-- (the QUIC endpoint maps a connection to its host by this), and what its last hello said.
-- A registered host that is not connected is 'lost' until its first hello.
ALTER TABLE hosts ADD COLUMN cert_sha256 TEXT;
ALTER TABLE hosts ADD COLUMN worker_version TEXT;
ALTER TABLE hosts ADD COLUMN disk_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN max_sandboxes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN templates TEXT NOT NULL DEFAULT '[]';
CREATE UNIQUE INDEX hosts_cert ON hosts(cert_sha256);
CREATE INDEX hosts_state_heartbeat ON hosts(state, last_heartbeat_at);
CREATE INDEX sandboxes_host_state ON sandboxes(host_id, state);

-- One-time tokens a platform admin hands to a new worker; only their SHA-256 is stored.
CREATE TABLE worker_registration_tokens (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_by TEXT REFERENCES users(id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    host_id TEXT REFERENCES hosts(id) ON DELETE SET NULL
);
