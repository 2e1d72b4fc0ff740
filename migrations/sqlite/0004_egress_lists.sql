-- Per-sandbox egress lists (E2B network.allowOut / network.denyOut) (sqlite). Keep in step with
-- ../postgres/0004_egress_lists.sql.

-- JSON arrays of the entries as the user wrote them (control validated them with
-- roost_proto::egress); every create and resume sends them to the worker, which builds the
-- sandbox's rules from them. Sandboxes made before this column: no lists.
ALTER TABLE sandboxes ADD COLUMN allow_out TEXT NOT NULL DEFAULT '[]';
ALTER TABLE sandboxes ADD COLUMN deny_out TEXT NOT NULL DEFAULT '[]';
