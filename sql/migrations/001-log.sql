-- The event log: its head (ids follow commit order, see src/event-log.ts),
-- its events, and the functions that publish into it.
CREATE TABLE sse_gateway.log_head (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  last_id bigint NOT NULL
);
INSERT INTO sse_gateway.log_head (last_id) VALUES (0);

CREATE TABLE sse_gateway.events (
  id bigint PRIMARY KEY,
  channel text NOT NULL,
  payload text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_channel_id ON sse_gateway.events (channel, id);

CREATE FUNCTION sse_gateway.publish_batch(channels text[], payloads text[])
RETURNS bigint[]
LANGUAGE plpgsql
AS $fn$
DECLARE
  n integer := coalesce(cardinality(channels), 0);
  first_id bigint;
  i integer;
BEGIN
  IF n <> coalesce(cardinality(payloads), 0) THEN
    RAISE EXCEPTION 'channels and payloads differ in length' USING ERRCODE = '22023';
  END IF;
  IF n = 0 THEN
    RETURN ARRAY[]::bigint[];
  END IF;
  FOR i IN 1..n LOOP
    IF channels[i] IS NULL OR channels[i] !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
      RAISE EXCEPTION 'invalid channel name %', quote_nullable(channels[i]) USING ERRCODE = '22023';
    END IF;
    IF payloads[i] IS NULL THEN
      RAISE EXCEPTION 'payload % is null', i USING ERRCODE = '22004';
    END IF;
  END LOOP;

  -- The row lock taken here is held until COMMIT: ids follow commit order.
  UPDATE sse_gateway.log_head SET last_id = last_id + n RETURNING last_id - n + 1 INTO first_id;

  INSERT INTO sse_gateway.events (id, channel, payload)
  SELECT first_id + k - 1, channels[k], payloads[k] FROM generate_subscripts(channels, 1) AS k;

  FOR i IN 1..n LOOP
    IF octet_length(payloads[i]) <= 7900 THEN
      PERFORM pg_notify(channels[i], E'\x1f' || (first_id + i - 1) || E'\n' || payloads[i]);
    ELSE
      PERFORM pg_notify(channels[i], E'\x1f' || (first_id + i - 1));
    END IF;
  END LOOP;

  RETURN ARRAY(SELECT first_id + k FROM generate_series(0, n - 1) AS k);
END
$fn$;

CREATE FUNCTION sse_gateway.publish(channel text, payload text)
RETURNS bigint
LANGUAGE sql
AS $fn$ SELECT (sse_gateway.publish_batch(ARRAY[channel], ARRAY[payload]))[1] $fn$;
