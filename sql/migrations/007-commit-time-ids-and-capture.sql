-- Ids drawn at commit, and row changes captured as events.
--
-- Until version 6, sse_gateway.publish drew its ids when called and kept the
-- row lock of log_head until its transaction ended: a transaction that
-- published and then worked for 10 s held every other publisher for 10 s.
-- Now a publish from SQL only stages its events, in pending_events, and a
-- deferred constraint trigger (flush_pending) draws the ids, writes the log
-- rows and NOTIFYs just before COMMIT. The wire and the log rows are those
-- of version 6: the flush and the gateway's own publish go through the same
-- append_checked.
--
-- And ids are drawn without updating any row: under REPEATABLE READ or
-- SERIALIZABLE, an UPDATE of log_head failed the COMMIT with 40001 whenever
-- another publish had committed since the snapshot. A draw takes the
-- advisory lock ID_LOCK_KEY (src/event-log.ts) until its transaction ends,
-- and moves the sequence event_ids; neither a lock nor a sequence reads
-- through the snapshot, and neither ever fails serialization. PostgreSQL
-- releases a transaction's locks after it became visible to others, so a
-- transaction that draws later commits later: ids follow commit order, as
-- before. A transaction that aborts after drawing (a serialization failure
-- at COMMIT, checked after the deferred triggers) leaves a hole: ids never
-- go backwards, but they may skip.

-- The last id drawn. setval marks it called: the next draw is head + 1,
-- from 1 on an empty log.
CREATE SEQUENCE sse_gateway.event_ids AS bigint MINVALUE 0 MAXVALUE 9007199254740991 NO CYCLE;
SELECT setval('sse_gateway.event_ids', (SELECT last_id FROM sse_gateway.log_head));
REVOKE ALL ON SEQUENCE sse_gateway.event_ids FROM PUBLIC;

-- The WAL timeline of the last draw (0: unknown), which tells a fork; a
-- sequence for the same reason, and so that a draw whose snapshot predates
-- the first draw on a new timeline does not take the fork again.
CREATE SEQUENCE sse_gateway.log_timeline AS integer MINVALUE 0 NO CYCLE;
SELECT setval('sse_gateway.log_timeline', coalesce((SELECT timeline FROM sse_gateway.log_head), 0));
REVOKE ALL ON SEQUENCE sse_gateway.log_timeline FROM PUBLIC;

-- log_head is no longer updated: it keeps the head of version 6, a floor
-- under the head readers compute (src/event-log.ts, BOUNDS_COLUMNS: the
-- largest of the last committed event, the retention's cut and this).
COMMENT ON TABLE sse_gateway.log_head IS 'The head at schema version 6; no longer updated: ids come from sse_gateway.event_ids';

-- The head: every id at or below it is committed (or was drawn by a
-- transaction that aborted), since a draw waits for every earlier one to
-- be visible.
CREATE FUNCTION sse_gateway.log_head_id()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
  SELECT greatest(
    coalesce((SELECT max(id) FROM sse_gateway.events), 0),
    (SELECT pruned_through FROM sse_gateway.log_retention),
    (SELECT last_id FROM sse_gateway.log_head))
$fn$;

-- What the SQL side needs of the gateway's settings: the largest payload a
-- captured row may make (MAX_PAYLOAD_BYTES), written by the gateway at
-- start-up (src/event-log.ts, recordSettings).
CREATE TABLE sse_gateway.settings (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  max_payload_bytes integer NOT NULL DEFAULT 65536 CHECK (max_payload_bytes > 0)
);
INSERT INTO sse_gateway.settings DEFAULT VALUES;

-- Events staged by open transactions: each row lives from its publish to
-- its transaction's commit (the flush deletes it) or rollback. Unlogged: a
-- crash ends the transactions, and with them every reason to keep a row.
-- Rows are found by their transaction's top-level id, so rows staged in a
-- savepoint go with it when it is rolled back, as their trigger events do.
CREATE UNLOGGED TABLE sse_gateway.pending_events (
  xact xid8 NOT NULL,
  seq bigint GENERATED ALWAYS AS IDENTITY,
  channel text COLLATE "C" NOT NULL,
  payload text NOT NULL,
  -- The first row a transaction stages arms the flush (see stage_checked).
  arms boolean NOT NULL DEFAULT false
);
CREATE INDEX pending_events_xact ON sse_gateway.pending_events (xact, seq);
REVOKE ALL ON sse_gateway.pending_events FROM PUBLIC;

-- Draws ids for events already checked, writes their log rows and NOTIFYs
-- them (the wire of version 6, src/event-log.ts); returns the first id.
-- The advisory lock ID_LOCK_KEY is held until the transaction ends:
-- callers draw at commit (the flush) or in a transaction that commits at
-- once (the gateway's publish_batch_now). Records the ids for
-- published_ids(). SQLSTATE 23514 past MAX_EVENT_ID (2^53 - 1), as the
-- CHECK on log_head raised until version 6.
CREATE FUNCTION sse_gateway.append_checked(channels text[], payloads text[])
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  n integer := cardinality(channels);
  first_id bigint;
  fork_id bigint;
  wal_timeline integer := sse_gateway.current_timeline();
BEGIN
  -- 1583218691 is ID_LOCK_KEY, 0x5e5e0003. Under it nobody else draws, so
  -- the sequence's last value is the last id drawn, and setval reserves a
  -- block.
  PERFORM pg_advisory_xact_lock(1583218691);
  IF pg_sequence_last_value('sse_gateway.event_ids') IS NULL THEN
    RAISE EXCEPTION 'sse_gateway.event_ids was reset: set it to the head' USING ERRCODE = '55000';
  END IF;
  IF coalesce(pg_sequence_last_value('sse_gateway.log_timeline'), 0) IS DISTINCT FROM wal_timeline THEN
    -- First draw on a new timeline: leave a hole over every id the old
    -- one may have drawn after what reached this server. On a new
    -- timeline nothing was committed since the promotion (this is its
    -- first draw), so any snapshot sees the last event kept. The
    -- sequences are not rolled back: should this transaction abort, the
    -- jump stays but its log_forks row goes, and whoever holds an id the
    -- old timeline lost may then not be told (gateway/missed) what was
    -- lost. Rare: the first draw after a promotion, aborted after it.
    fork_id := sse_gateway.log_head_id();
    first_id := greatest(pg_sequence_last_value('sse_gateway.event_ids'), fork_id) + 1000000000000;
    PERFORM setval('sse_gateway.event_ids', first_id);
    PERFORM setval('sse_gateway.log_timeline', wal_timeline);
    INSERT INTO sse_gateway.log_forks (fork_id, resumed_after, timeline) VALUES (fork_id, first_id, wal_timeline);
  END IF;
  first_id := pg_sequence_last_value('sse_gateway.event_ids') + 1;
  IF first_id + n - 1 > 9007199254740991 THEN
    RAISE EXCEPTION 'the log has no id left for % events: ids end at 9007199254740991', n USING ERRCODE = '23514';
  END IF;
  PERFORM setval('sse_gateway.event_ids', first_id + n - 1);

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

  -- A transaction that flushes twice (a publish after the first flush)
  -- draws consecutive ids: it holds the lock from the first draw on.
  PERFORM set_config('sse_gateway.xact_first_id', coalesce(nullif(current_setting('sse_gateway.xact_first_id', true), ''), first_id::text), true);
  PERFORM set_config('sse_gateway.published_ids', current_setting('sse_gateway.xact_first_id') || '-' || (first_id + n - 1), false);
  RETURN first_id;
END
$fn$;
REVOKE ALL ON FUNCTION sse_gateway.append_checked(text[], text[]) FROM PUBLIC;

-- The gateway's own publish (src/event-log.ts, publishBatch): draws the ids
-- now and returns them, so it must run in a transaction that commits at
-- once (one statement). Not for other roles: in a transaction of theirs it
-- would hold every publisher until their COMMIT. They call publish_batch.
CREATE FUNCTION sse_gateway.publish_batch_now(channels text[], payloads text[])
RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  n integer := sse_gateway.check_batch(channels, payloads);
  first_id bigint;
BEGIN
  IF n = 0 THEN
    RETURN ARRAY[]::bigint[];
  END IF;
  first_id := sse_gateway.append_checked(channels, payloads);
  RETURN ARRAY(SELECT first_id + k FROM generate_series(0, n - 1) AS k);
END
$fn$;
REVOKE ALL ON FUNCTION sse_gateway.publish_batch_now(text[], text[]) FROM PUBLIC;

-- Stages events already checked, in order. The first row a transaction
-- stages queues the deferred flush (arms = true fires the constraint
-- trigger below); the custom setting sse_gateway.flush_armed, local to the
-- transaction, tells that it is queued. PostgreSQL rolls a savepoint's
-- settings back with it, as it drops its rows and trigger events, so a
-- publish after a rolled-back savepoint arms the flush again. The flush
-- clears the setting: a publish after it (from a deferred trigger of the
-- user's that fires later) queues another flush, which the commit runs too.
CREATE FUNCTION sse_gateway.stage_checked(channels text[], payloads text[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  tx xid8 := pg_current_xact_id();
  armed boolean := current_setting('sse_gateway.flush_armed', true) IS NOT DISTINCT FROM tx::text;
BEGIN
  INSERT INTO sse_gateway.pending_events (xact, channel, payload, arms)
  SELECT tx, c, p, NOT armed AND k = 1 FROM unnest(channels, payloads) WITH ORDINALITY AS e(c, p, k) ORDER BY k;
  IF NOT armed THEN
    PERFORM set_config('sse_gateway.flush_armed', tx::text, true);
  END IF;
END
$fn$;
REVOKE ALL ON FUNCTION sse_gateway.stage_checked(text[], text[]) FROM PUBLIC;

-- Runs just before COMMIT (or at SET CONSTRAINTS ... IMMEDIATE): publishes
-- every event the transaction staged, in the order staged.
CREATE FUNCTION sse_gateway.flush_pending()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  channels text[];
  payloads text[];
BEGIN
  PERFORM set_config('sse_gateway.flush_armed', '', true);
  WITH taken AS (
    DELETE FROM sse_gateway.pending_events WHERE xact = pg_current_xact_id() RETURNING seq, channel, payload
  )
  SELECT array_agg(channel ORDER BY seq), array_agg(payload ORDER BY seq) INTO channels, payloads FROM taken;
  IF channels IS NOT NULL THEN
    PERFORM sse_gateway.append_checked(channels, payloads);
  END IF;
  RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION sse_gateway.flush_pending() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER flush_at_commit AFTER INSERT ON sse_gateway.pending_events
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.arms) EXECUTE FUNCTION sse_gateway.flush_pending();
-- Even with session_replication_role = replica (which silences ordinary
-- triggers): a staged event must never be committed unpublished.
ALTER TABLE sse_gateway.pending_events ENABLE ALWAYS TRIGGER flush_at_commit;

-- publish and publish_batch stage, and so return nothing: the ids are
-- drawn at commit. A changed return type needs DROP and CREATE, which
-- would reset the functions' privileges to the default (EXECUTE to
-- PUBLIC): whoever had revoked that and granted it to a role gets it back
-- as it was.
CREATE TEMP TABLE publish_acl ON COMMIT DROP AS
SELECT p.oid::regprocedure::text AS signature, p.proacl AS acl
FROM pg_proc p
WHERE p.oid IN ('sse_gateway.publish(text, text)'::regprocedure, 'sse_gateway.publish_batch(text[], text[])'::regprocedure);

DROP FUNCTION sse_gateway.publish(text, text);
DROP FUNCTION sse_gateway.publish_batch(text[], text[]);

CREATE FUNCTION sse_gateway.publish_batch(channels text[], payloads text[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  IF sse_gateway.check_batch(channels, payloads) > 0 THEN
    PERFORM sse_gateway.stage_checked(channels, payloads);
  END IF;
END
$fn$;

CREATE FUNCTION sse_gateway.publish(channel text, payload text)
RETURNS void
LANGUAGE sql
AS $fn$ SELECT sse_gateway.publish_batch(ARRAY[channel], ARRAY[payload]) $fn$;

DO $acl$
DECLARE
  f record;
  g record;
BEGIN
  FOR f IN SELECT signature, acl FROM publish_acl WHERE acl IS NOT NULL LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.signature);
    FOR g IN SELECT grantee, is_grantable FROM aclexplode(f.acl) WHERE privilege_type = 'EXECUTE' LOOP
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', f.signature,
        CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END,
        CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
  END LOOP;
END
$acl$;

-- The ids the last publishing transaction of this session committed, in
-- order (empty when none did): publish returns none, since they are drawn
-- at commit. Like currval, per session: behind a transaction-pooling proxy
-- another client's commit may answer.
CREATE FUNCTION sse_gateway.published_ids()
RETURNS bigint[]
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
  SELECT coalesce(ARRAY(SELECT generate_series(split_part(r, '-', 1)::bigint, split_part(r, '-', 2)::bigint)), ARRAY[]::bigint[])
  FROM (SELECT nullif(current_setting('sse_gateway.published_ids', true), '') AS r) AS s
$fn$;

-- Row changes as events (README, "Row changes").
--
-- The members of a JSON object whose keys are listed; NULL for NULL.
CREATE FUNCTION sse_gateway.pick_keys(object jsonb, keys text[])
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
AS $fn$
  SELECT CASE WHEN object IS NOT NULL THEN (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}') FROM jsonb_each(object) AS e WHERE e.key = ANY(keys)) END
$fn$;

-- capture_row_changes is the trigger function of the statement-level
-- triggers capture_changes installs: one event per row, in the order the
-- statement changed the rows, staged like a publish. It runs as the log's
-- owner, so that any role that writes the table publishes without rights
-- on this schema, and raises nothing of its own: a row too large for
-- max_payload_bytes becomes an event with its primary key only and
-- "truncated": true. UPDATE pairs the old and new transition tables by
-- position: PostgreSQL appends a row's old and new versions together.
-- Arguments: the channel, then optionally the columns (a text[] literal).
CREATE FUNCTION sse_gateway.capture_row_changes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
-- A custom plan per statement cost 1 ms a call (the queries take arrays
-- and transition tables the planner cannot see into); the generic plan
-- does as well.
SET plan_cache_mode = force_generic_plan
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  columns text[] := CASE WHEN TG_NARGS > 1 THEN TG_ARGV[1]::text[] END;
  head text := '{"op":"' || TG_OP || '","schema":' || to_jsonb(TG_TABLE_SCHEMA::text)::text || ',"table":' || to_jsonb(TG_TABLE_NAME::text)::text;
  olds jsonb[];
  news jsonb[];
  payloads text[];
  longest integer;
  max_bytes integer;
  key text[];
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM sse_gateway.stage_checked(ARRAY[TG_ARGV[0]], ARRAY[head || '}']);
    RETURN NULL;
  ELSIF TG_OP = 'INSERT' THEN
    SELECT array_agg(p), max(octet_length(p)) INTO payloads, longest FROM (
      SELECT head || ',"new":' || (CASE WHEN columns IS NULL THEN to_jsonb(r) ELSE sse_gateway.pick_keys(to_jsonb(r), columns) END)::text || '}' AS p
      FROM new_rows AS r
    ) AS e;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(p), max(octet_length(p)) INTO payloads, longest FROM (
      SELECT head || ',"old":' || (CASE WHEN columns IS NULL THEN to_jsonb(r) ELSE sse_gateway.pick_keys(to_jsonb(r), columns) END)::text || '}' AS p
      FROM old_rows AS r
    ) AS e;
  ELSE
    SELECT array_agg(CASE WHEN columns IS NULL THEN to_jsonb(r) ELSE sse_gateway.pick_keys(to_jsonb(r), columns) END) INTO olds FROM old_rows AS r;
    SELECT array_agg(CASE WHEN columns IS NULL THEN to_jsonb(r) ELSE sse_gateway.pick_keys(to_jsonb(r), columns) END) INTO news FROM new_rows AS r;
    SELECT array_agg(p ORDER BY k), max(octet_length(p)) INTO payloads, longest FROM (
      SELECT k, head || ',"new":' || n::text || ',"old":' || o::text || '}' AS p
      FROM unnest(olds, news) WITH ORDINALITY AS u(o, n, k)
    ) AS e;
  END IF;
  IF payloads IS NULL THEN
    -- A statement that changed no row.
    RETURN NULL;
  END IF;

  SELECT s.max_payload_bytes INTO max_bytes FROM sse_gateway.settings AS s;
  IF longest > max_bytes THEN
    -- Rows too large: their primary key only (or nothing, if even that is too large).
    key := ARRAY(
      SELECT a.attname::text FROM pg_index AS i JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
      WHERE i.indrelid = TG_RELID AND i.indisprimary);
    SELECT array_agg(CASE
        WHEN octet_length(u.p) <= max_bytes THEN u.p
        WHEN octet_length(keyed.p) <= max_bytes THEN keyed.p
        ELSE head || ',"truncated":true}'
      END ORDER BY u.k)
    INTO payloads
    FROM unnest(payloads) WITH ORDINALITY AS u(p, k)
    CROSS JOIN LATERAL (
      SELECT CASE WHEN octet_length(u.p) > max_bytes THEN head || ',"truncated":true'
        || coalesce(',"new":' || sse_gateway.pick_keys(u.p::jsonb -> 'new', key)::text, '')
        || coalesce(',"old":' || sse_gateway.pick_keys(u.p::jsonb -> 'old', key)::text, '')
        || '}' END AS p
    ) AS keyed;
  END IF;

  PERFORM sse_gateway.stage_checked(array_fill(TG_ARGV[0], ARRAY[cardinality(payloads)]), payloads);
  RETURN NULL;
END
$fn$;

-- The triggers capture_changes installs on a table, by the statement they follow.
CREATE FUNCTION sse_gateway.capture_trigger_names()
RETURNS TABLE (name text, operation text, transition text)
LANGUAGE sql
IMMUTABLE
AS $fn$
  VALUES ('sse_gateway_capture_insert', 'INSERT', 'REFERENCING NEW TABLE AS new_rows'),
         ('sse_gateway_capture_update', 'UPDATE', 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
         ('sse_gateway_capture_delete', 'DELETE', 'REFERENCING OLD TABLE AS old_rows'),
         ('sse_gateway_capture_truncate', 'TRUNCATE', '')
$fn$;

-- Publishes every committed INSERT, UPDATE, DELETE and TRUNCATE of a table
-- on a channel (by default "schema.table"), with the given columns (by
-- default all). Runs with the caller's rights: creating triggers on the
-- table needs its owner. Idempotent: called again, it replaces the
-- triggers (another channel, other columns). Returns the channel.
-- SQLSTATE 22023 for a channel name the gateway refuses, 42703 for a
-- column the table does not have.
CREATE FUNCTION sse_gateway.capture_changes(relation regclass, channel text DEFAULT NULL, columns text[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  target text := coalesce(channel, (SELECT n.nspname || '.' || c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = relation));
  missing text;
  t record;
BEGIN
  IF octet_length(target) NOT BETWEEN 1 AND 63 OR target ~ '[^A-Za-z0-9_.:-]' THEN
    RAISE EXCEPTION 'invalid channel name %: name one of 1 to 63 characters of A-Z a-z 0-9 _ . : -', quote_literal(target)
      USING ERRCODE = '22023', HINT = 'SELECT sse_gateway.capture_changes(''schema.table'', ''a_channel'')';
  END IF;
  IF columns IS NOT NULL THEN
    SELECT c INTO missing FROM unnest(columns) AS c
    WHERE c IS NULL OR NOT EXISTS (SELECT FROM pg_attribute AS a WHERE a.attrelid = relation AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
    LIMIT 1;
    IF FOUND THEN
      RAISE EXCEPTION 'column % of % does not exist', quote_nullable(missing), relation USING ERRCODE = '42703';
    END IF;
  END IF;
  PERFORM sse_gateway.stop_capturing_changes(relation);
  FOR t IN SELECT * FROM sse_gateway.capture_trigger_names() LOOP
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION sse_gateway.capture_row_changes(%L%s)',
      t.name, t.operation, relation, t.transition, target, CASE WHEN columns IS NULL THEN '' ELSE format(', %L', columns::text) END);
  END LOOP;
  RETURN target;
END
$fn$;

-- Removes what capture_changes installed; idempotent.
CREATE FUNCTION sse_gateway.stop_capturing_changes(relation regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT tg.tgname FROM pg_trigger AS tg JOIN sse_gateway.capture_trigger_names() AS c ON c.name = tg.tgname WHERE tg.tgrelid = relation LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, relation);
  END LOOP;
END
$fn$;
