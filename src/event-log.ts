import type pg from 'pg'

// The event log lives in its own schema; every gateway instance on a database
// shares it. Names starting with pg_ are reserved by PostgreSQL.
export const LOG_SCHEMA = 'sse_gateway'

// A notification payload must be shorter than 8000 bytes. Payloads up to this
// size travel inline in the NOTIFY; larger ones travel as a reference to
// their log row, which the listener reads.
export const INLINE_PAYLOAD_BYTES = 7900

/*
 * The wire between a publishing transaction and every listener.
 *
 * An event published through the gateway (the POST routes or the SQL function
 * sse_gateway.publish) is NOTIFYed on its own channel with a payload that
 * starts with the unit separator U+001F, then its decimal id:
 *
 *   "\x1f<id>\n<payload>"   the payload inline
 *   "\x1f<id>"              the payload is in sse_gateway.events, row <id>
 *
 * Anything else is a plain NOTIFY from some other session and is delivered as
 * is, without an id. Because every gateway event carries its own id, two
 * events with the same channel and payload in one transaction stay two
 * notifications (PostgreSQL folds identical pairs).
 *
 * Ids follow commit order: the publishing transaction takes the row lock of
 * sse_gateway.log_head when it draws its ids and keeps it until it commits,
 * so a transaction that draws later also commits later, and ids have no gaps
 * (a rollback returns the numbers it drew).
 */
export const WIRE_MARK = '\x1f'

export type DecodedNotification =
  | { id: string, data: string }
  | { id: string, data: undefined }
  | null

export function decodeNotification (payload: string): DecodedNotification {
  if (payload.charCodeAt(0) !== 0x1f) return null
  const newline = payload.indexOf('\n')
  const id = newline === -1 ? payload.slice(1) : payload.slice(1, newline)
  if (!/^[1-9][0-9]{0,18}$/.test(id)) return null
  return { id, data: newline === -1 ? undefined : payload.slice(newline + 1) }
}

// Each entry runs once, in order, in its own transaction, and is recorded in
// sse_gateway.schema_version. Hand-written rather than a migration library:
// it is one schema owned by this program, migrated at start-up under an
// advisory lock so that instances starting together do not race.
const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE ${LOG_SCHEMA}.log_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id bigint NOT NULL
  );
  INSERT INTO ${LOG_SCHEMA}.log_head (last_id) VALUES (0);

  CREATE TABLE ${LOG_SCHEMA}.events (
    id bigint PRIMARY KEY,
    channel text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE INDEX events_channel_id ON ${LOG_SCHEMA}.events (channel, id);

  CREATE FUNCTION ${LOG_SCHEMA}.publish_batch(channels text[], payloads text[])
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
    UPDATE ${LOG_SCHEMA}.log_head SET last_id = last_id + n RETURNING last_id - n + 1 INTO first_id;

    INSERT INTO ${LOG_SCHEMA}.events (id, channel, payload)
    SELECT first_id + k - 1, channels[k], payloads[k] FROM generate_subscripts(channels, 1) AS k;

    FOR i IN 1..n LOOP
      IF octet_length(payloads[i]) <= ${INLINE_PAYLOAD_BYTES} THEN
        PERFORM pg_notify(channels[i], E'\\x1f' || (first_id + i - 1) || E'\\n' || payloads[i]);
      ELSE
        PERFORM pg_notify(channels[i], E'\\x1f' || (first_id + i - 1));
      END IF;
    END LOOP;

    RETURN ARRAY(SELECT first_id + k FROM generate_series(0, n - 1) AS k);
  END
  $fn$;

  CREATE FUNCTION ${LOG_SCHEMA}.publish(channel text, payload text)
  RETURNS bigint
  LANGUAGE sql
  AS $fn$ SELECT (${LOG_SCHEMA}.publish_batch(ARRAY[channel], ARRAY[payload]))[1] $fn$;
  `
]

// An arbitrary constant: the key of the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY = 0x5e5e_0001

/** Creates or upgrades the log schema. Safe to run from many instances at once. */
export async function migrate (client: pg.ClientBase): Promise<void> {
  await client.query('BEGIN')
  try {
    await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY])
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${LOG_SCHEMA}`)
    await client.query(`CREATE TABLE IF NOT EXISTS ${LOG_SCHEMA}.schema_version (version integer NOT NULL)`)
    const { rows } = await client.query<{ version: number | null }>(`SELECT max(version) AS version FROM ${LOG_SCHEMA}.schema_version`)
    const applied = rows[0]?.version ?? 0
    for (let version = applied + 1; version <= MIGRATIONS.length; version++) {
      await client.query(MIGRATIONS[version - 1] as string)
      await client.query(`INSERT INTO ${LOG_SCHEMA}.schema_version (version) VALUES ($1)`, [version])
    }
    await client.query('COMMIT')
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {})
    throw err
  }
}

export interface EventToPublish {
  channel: string
  payload: string
}

/**
 * Publishes events atomically: one transaction writes their log rows and
 * NOTIFYs them; either all are delivered or none is. Resolves with their ids,
 * in order, once COMMIT has succeeded.
 */
export async function publishEvents (pool: pg.Pool, events: readonly EventToPublish[]): Promise<string[]> {
  const client = await pool.connect()
  let failed: unknown
  try {
    await client.query('BEGIN')
    const { rows } = await client.query<{ ids: string[] }>(
      `SELECT ${LOG_SCHEMA}.publish_batch($1::text[], $2::text[])::text[] AS ids`,
      [events.map((e) => e.channel), events.map((e) => e.payload)]
    )
    await client.query('COMMIT')
    return rows[0]?.ids ?? []
  } catch (err) {
    failed = err
    await client.query('ROLLBACK').catch(() => {})
    throw err
  } finally {
    // A client whose connection broke must not go back to the pool.
    client.release(failed instanceof Error && !('code' in failed) ? failed : undefined)
  }
}

export interface LoggedEvent {
  id: string
  channel: string
  payload: string
}

/** Reads events by id, in id order. */
export async function readEvents (client: pg.ClientBase, ids: readonly string[]): Promise<LoggedEvent[]> {
  const { rows } = await client.query<LoggedEvent>(
    `SELECT id::text AS id, channel, payload FROM ${LOG_SCHEMA}.events WHERE id = ANY($1::bigint[]) ORDER BY id`,
    [ids]
  )
  return rows
}
