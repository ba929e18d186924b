-- The wire key (the wire is described in src/event-log.ts): 32 bytes from two
-- random UUIDs (pg_strong_random; 244 random bits), and its HMAC pads,
-- the key zero-filled to SHA-256's 64-byte block XOR 0x36 and 0x5c
-- (RFC 2104), computed once here since SQL has no XOR on bytea.
CREATE TABLE sse_gateway.wire_key (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  key bytea NOT NULL,
  inner_pad bytea NOT NULL,
  outer_pad bytea NOT NULL
);
REVOKE ALL ON sse_gateway.wire_key FROM PUBLIC;
DO $key$
DECLARE
  k bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
  inner_pad bytea := ''::bytea;
  outer_pad bytea := ''::bytea;
  b integer;
BEGIN
  FOR i IN 0..63 LOOP
    b := CASE WHEN i < length(k) THEN get_byte(k, i) ELSE 0 END;
    inner_pad := inner_pad || set_byte('\x00'::bytea, 0, b # 54);
    outer_pad := outer_pad || set_byte('\x00'::bytea, 0, b # 92);
  END LOOP;
  INSERT INTO sse_gateway.wire_key (key, inner_pad, outer_pad) VALUES (k, inner_pad, outer_pad);
END
$key$;

-- The timeline the primary writes WAL on: a promotion or a point-in-time
-- recovery starts a new one.
CREATE FUNCTION sse_gateway.current_timeline() RETURNS integer
LANGUAGE sql VOLATILE
AS $fn$ SELECT ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::integer $fn$;

-- Ids stay exact as JavaScript numbers (src/event-id.ts); the timeline of
-- the last publish tells a fork.
ALTER TABLE sse_gateway.log_head ADD COLUMN timeline integer;
UPDATE sse_gateway.log_head SET timeline = sse_gateway.current_timeline();
ALTER TABLE sse_gateway.log_head ADD CONSTRAINT log_head_last_id_exact CHECK (last_id <= 9007199254740991);

-- One row per fork: the log continued on a new timeline after fork_id,
-- and ids in (fork_id, resumed_after] were never drawn on it (FORK_ID_GAP).
CREATE TABLE sse_gateway.log_forks (
  fork_id bigint NOT NULL,
  resumed_after bigint NOT NULL,
  timeline integer NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- What publish_batch refuses, apart: SQLSTATE 22023 for arrays that do
-- not pair up or a bad channel name, 22004 for a NULL payload.
CREATE FUNCTION sse_gateway.check_batch(channels text[], payloads text[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  n integer := coalesce(cardinality(channels), 0);
  bad text;
BEGIN
  IF n <> coalesce(cardinality(payloads), 0) THEN
    RAISE EXCEPTION 'channels and payloads differ in length' USING ERRCODE = '22023';
  ELSIF n > 0 AND (array_ndims(channels) <> 1 OR array_ndims(payloads) <> 1 OR array_lower(channels, 1) <> 1 OR array_lower(payloads, 1) <> 1) THEN
    RAISE EXCEPTION 'channels and payloads must be one-dimensional arrays indexed from 1' USING ERRCODE = '22023';
  END IF;
  SELECT c INTO bad FROM unnest(channels) AS c
  WHERE c IS NULL OR octet_length(c) NOT BETWEEN 1 AND 63 OR c ~ '[^A-Za-z0-9_.:-]'
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid channel name %', quote_nullable(bad) USING ERRCODE = '22023';
  ELSIF array_position(payloads, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'payload % is null', array_position(payloads, NULL) USING ERRCODE = '22004';
  END IF;
  RETURN n;
END
$fn$;

-- publish_batch runs as the log's owner (SECURITY DEFINER), the only role
-- that reads the wire key, with a search_path that no caller can change.
CREATE OR REPLACE FUNCTION sse_gateway.publish_batch(channels text[], payloads text[])
RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  n integer := sse_gateway.check_batch(channels, payloads);
  first_id bigint;
  head_timeline integer;
  wal_timeline integer;
BEGIN
  IF n = 0 THEN
    RETURN ARRAY[]::bigint[];
  END IF;
  wal_timeline := sse_gateway.current_timeline();
  -- The row lock taken here is held until COMMIT: ids follow commit order.
  UPDATE sse_gateway.log_head SET last_id = last_id + n
  RETURNING last_id - n + 1, log_head.timeline INTO first_id, head_timeline;
  IF head_timeline IS DISTINCT FROM wal_timeline THEN
    -- First publish on a new timeline: leave a hole over every id the
    -- old one may have drawn after what reached this server.
    UPDATE sse_gateway.log_head SET last_id = last_id + 1000000000000, timeline = wal_timeline;
    INSERT INTO sse_gateway.log_forks (fork_id, resumed_after, timeline)
    VALUES (first_id - 1, first_id - 1 + 1000000000000, wal_timeline);
    first_id := first_id + 1000000000000;
  END IF;

  INSERT INTO sse_gateway.events (id, channel, payload)
  SELECT first_id + k - 1, c, p FROM unnest(channels, payloads) WITH ORDINALITY AS e(c, p, k);

  -- pg_notify is volatile, so PostgreSQL calls it after the sort: in id
  -- order. The MAC is HMAC-SHA-256 over the UTF-8 message. 7900 is
  -- INLINE_PAYLOAD_BYTES (src/event-log.ts).
  PERFORM pg_notify(w.c, E'\x1f' || w.id || ':' || encode(substr(sha256(key.outer_pad || sha256(key.inner_pad || convert_to(w.id || E'\n' || w.c || w.inline, 'UTF8'))), 1, 16), 'hex') || w.inline)
  FROM (
    SELECT k, c, (first_id + k - 1)::text AS id, CASE WHEN octet_length(p) <= 7900 THEN E'\n' || p ELSE '' END AS inline
    FROM unnest(channels, payloads) WITH ORDINALITY AS e(c, p, k)
  ) AS w, sse_gateway.wire_key AS key
  ORDER BY w.k;

  RETURN ARRAY(SELECT first_id + k FROM generate_series(0, n - 1) AS k);
END
$fn$;
