import type pg from 'pg'
import { type EventId, parseEventId } from '../event-id.js'
import { LOG_SCHEMA } from '../event-log.js'
import { MERCURE_CHANNEL } from './update.js'

/**
 * The log id of the earliest update with this Mercure id (an id may be
 * published more than once; Mercure 1.0 resumes from its first use), or
 * undefined when the log holds none (never published, or pruned). Uses the
 * partial index events_mercure_id (migration 008), whose predicate the
 * query must spell as it is: the channel is a literal, not a parameter.
 */
export async function findUpdate (db: pg.Pool | pg.ClientBase, mercureId: string): Promise<EventId | undefined> {
  const { rows } = await db.query<{ id: string | null }>(
    `SELECT min(id)::text AS id FROM ${LOG_SCHEMA}.events WHERE channel = '${MERCURE_CHANNEL}' AND (payload::jsonb ->> 'id') = $1`,
    [mercureId]
  )
  const id = rows[0]?.id
  return id === null || id === undefined ? undefined : parseEventId(id)
}

/** The Mercure id of the last update in the log, or `earliest` when there is none (the subscriptions API's cursor). */
export async function lastUpdateId (db: pg.Pool | pg.ClientBase): Promise<string> {
  const { rows } = await db.query<{ id: string | null }>(
    `SELECT payload::jsonb ->> 'id' AS id FROM ${LOG_SCHEMA}.events WHERE channel = '${MERCURE_CHANNEL}' ORDER BY id DESC LIMIT 1`
  )
  return rows[0]?.id ?? 'earliest'
}
