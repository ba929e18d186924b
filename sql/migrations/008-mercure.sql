-- Mercure (README, "Mercure"): every update is an event of the log on one
-- reserved channel, mercure/updates, whose payload is the update as JSON
-- ({"id", "topics", "data", "private", "type"?, "retry"?}, src/mercure/update.ts).

-- check_batch as in version 6, but for the reserved channel: channel names
-- never hold a `/`, so no client can name mercure/updates, yet the gateway
-- (and mercure_publish, through publish) logs on it.
CREATE OR REPLACE FUNCTION sse_gateway.check_batch(channels text[], payloads text[])
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
  WHERE c IS NULL OR (c <> 'mercure/updates' AND (octet_length(c) NOT BETWEEN 1 AND 63 OR c ~ '[^A-Za-z0-9_.:-]'))
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid channel name %', quote_nullable(bad) USING ERRCODE = '22023';
  ELSIF array_position(payloads, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'payload % is null', array_position(payloads, NULL) USING ERRCODE = '22004';
  END IF;
  RETURN n;
END
$fn$;

-- A subscriber resumes from a Mercure id (Last-Event-ID), which is any text
-- and may repeat: this finds the log id of its earliest update (Mercure 1.0
-- says a repeated id resumes from its earliest use). Only the reserved
-- channel's rows are indexed, and the index goes with them when retention
-- prunes the log. A hash index: an id may be longer than a B-tree entry
-- may be (2,704 bytes), and it is only ever looked up by equality.
CREATE INDEX events_mercure_id ON sse_gateway.events USING hash (((payload::jsonb) ->> 'id')) WHERE channel = 'mercure/updates';

-- Publishes a Mercure update in the caller's transaction: delivered on
-- COMMIT, dropped on ROLLBACK, like sse_gateway.publish, which it calls
-- (so it needs the same rights). Returns the update's id: `id` as given,
-- or urn:uuid: and a UUIDv7 (RFC 9562) made here. SQLSTATE 22023 for what
-- the HTTP publish refuses with a 400: no topic, a NULL or `*` topic,
-- control characters in a topic, the id or the type, an id that is empty,
-- starts with # or is "earliest", the type "mercure", a negative retry.
CREATE FUNCTION sse_gateway.mercure_publish(
  topics text[],
  data text DEFAULT '',
  private boolean DEFAULT false,
  id text DEFAULT NULL,
  type text DEFAULT NULL,
  retry integer DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  update_id text := id;
  payload jsonb;
BEGIN
  IF coalesce(cardinality(topics), 0) = 0 OR array_position(topics, NULL) IS NOT NULL OR '*' = ANY(topics) THEN
    RAISE EXCEPTION 'an update needs one or more topics, none NULL or *' USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT FROM unnest(topics) AS t WHERE t ~ '[[:cntrl:]]') OR id ~ '[[:cntrl:]]' OR type ~ '[[:cntrl:]]' THEN
    RAISE EXCEPTION 'topics, id and type may not contain control characters' USING ERRCODE = '22023';
  END IF;
  IF id = '' OR left(id, 1) = '#' OR id = 'earliest' THEN
    RAISE EXCEPTION 'an id may not be empty, start with # or be "earliest"' USING ERRCODE = '22023';
  END IF;
  IF type = 'mercure' THEN
    RAISE EXCEPTION 'the type "mercure" is reserved for the hub''s own events' USING ERRCODE = '22023';
  END IF;
  IF retry < 0 THEN
    RAISE EXCEPTION 'retry must be a number of milliseconds' USING ERRCODE = '22023';
  END IF;
  IF update_id IS NULL THEN
    -- A UUIDv7: 48 bits of Unix milliseconds over a random (version 4)
    -- UUID, whose version bits 0100 become 0111.
    update_id := 'urn:uuid:' || encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
      PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid::text;
  END IF;
  payload := jsonb_build_object('id', update_id, 'topics', to_jsonb(topics), 'data', coalesce(data, ''), 'private', coalesce(private, false));
  IF type IS NOT NULL AND type <> '' THEN
    payload := payload || jsonb_build_object('type', type);
  END IF;
  IF retry IS NOT NULL THEN
    payload := payload || jsonb_build_object('retry', retry);
  END IF;
  PERFORM sse_gateway.publish('mercure/updates', payload::text);
  RETURN update_id;
END
$fn$;

-- Active subscriptions (Mercure's subscriptions API), shared by every
-- instance: one row per subscription of a live stream, removed when the
-- stream ends. An instance that stops without removing its rows (a crash)
-- stops renewing seen_at, and the others sweep its rows.
CREATE TABLE sse_gateway.mercure_instances (
  instance uuid PRIMARY KEY,
  seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sse_gateway.mercure_subscriptions (
  subscriber text NOT NULL,
  -- legacy (draft-07 topic selectors), exact or urlpattern.
  match_type text NOT NULL,
  match text NOT NULL,
  payload jsonb,
  instance uuid NOT NULL REFERENCES sse_gateway.mercure_instances ON DELETE CASCADE,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (subscriber, match_type, match)
);
CREATE INDEX mercure_subscriptions_instance ON sse_gateway.mercure_subscriptions (instance);
CREATE INDEX mercure_subscriptions_match ON sse_gateway.mercure_subscriptions (match_type, match);
