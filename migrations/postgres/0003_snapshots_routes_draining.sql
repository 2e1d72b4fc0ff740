-- Snapshots as templates, public-traffic settings for the gateway, host draining and
-- certificate renewal (postgres). Keep in step with ../sqlite/0003_snapshots_routes_draining.sql.

-- Whether ports other than envd's are open to anyone (1) or need the traffic access token.
ALTER TABLE sandboxes ADD COLUMN allow_public_traffic BIGINT NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;

-- A snapshot is a team template ('snapshot') made from a sandbox; it lives on the host that
-- took it (host_id), so placement sends sandboxes made from it there. name is the optional
-- team-scoped name given at creation.
ALTER TABLE templates ADD COLUMN kind TEXT NOT NULL DEFAULT 'template';
ALTER TABLE templates ADD COLUMN name TEXT;
ALTER TABLE templates ADD COLUMN source_sandbox_id TEXT;
ALTER TABLE templates ADD COLUMN host_id TEXT;
ALTER TABLE templates ADD COLUMN size_bytes BIGINT;
CREATE UNIQUE INDEX templates_team_name ON templates(team_id, name);
CREATE INDEX templates_team_kind ON templates(team_id, kind, created_at, id);

-- A draining host takes no new sandboxes; its sandboxes keep running.
ALTER TABLE hosts ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
-- After a certificate renewal, the previous certificate's hash: it stays usable until it
-- expires (TLS enforces the expiry), so a worker can reconnect with either.
ALTER TABLE hosts ADD COLUMN previous_cert_sha256 TEXT;
CREATE INDEX hosts_previous_cert ON hosts(previous_cert_sha256);
