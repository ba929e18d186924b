-- Subscribe tickets (src/tickets.ts): short-lived, single-use, shared by
-- every instance. Only a hash of the ticket is kept.
CREATE TABLE sse_gateway.tickets (
  hash text PRIMARY KEY,
  channels text[] NOT NULL,
  subject text,
  token_expires_at bigint,
  expires_at timestamptz NOT NULL
);
CREATE INDEX tickets_expires_at ON sse_gateway.tickets (expires_at);
