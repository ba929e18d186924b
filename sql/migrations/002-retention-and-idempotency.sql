-- Everything up to pruned_through has been deleted by retention. Kept apart
-- from log_head so that pruning never waits on publishers' row lock.
CREATE TABLE sse_gateway.log_retention (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  pruned_through bigint NOT NULL
);
INSERT INTO sse_gateway.log_retention (pruned_through) VALUES (0);
CREATE INDEX events_created_at ON sse_gateway.events (created_at);

CREATE TABLE sse_gateway.idempotency_keys (
  key text PRIMARY KEY,
  request_hash text NOT NULL,
  ids bigint[] NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON sse_gateway.idempotency_keys (created_at);
