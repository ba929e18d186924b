import { createHash, randomBytes } from 'node:crypto'
import type pg from 'pg'
import { LOG_SCHEMA } from './event-log.js'

// Subscribe tickets stand in for a long-lived token in a URL (EventSource
// cannot send headers): a ticket opens one stream, on the channels it names,
// within seconds of being issued, once. Their state is in the database so
// that any instance can redeem a ticket another issued, and only once.

/** Every ticket starts with this, which no JWT does (a JWT starts with `eyJ`). */
export const TICKET_PREFIX = 'tkt_'

export interface TicketGrant {
  /** The exact channels the ticket may open a stream on. */
  channels: readonly string[]
  /** The `sub` of the token it was issued for. */
  subject: string | undefined
  /** The `exp` (seconds) of the token it was issued for: the stream ends then. */
  tokenExpiresAt: number | undefined
}

export function isTicket (token: string): boolean {
  return token.startsWith(TICKET_PREFIX)
}

function hashOf (ticket: string): string {
  // The table holds hashes: reading it gives no usable ticket.
  return createHash('sha256').update(ticket).digest('base64url')
}

/** Issues a ticket valid for `ttlSeconds`. */
export async function issueTicket (pool: pg.Pool, grant: TicketGrant, ttlSeconds: number): Promise<string> {
  const ticket = TICKET_PREFIX + randomBytes(32).toString('base64url')
  // Tickets nobody redeemed would pile up: each issue sweeps the expired ones.
  await pool.query(`
    WITH swept AS (DELETE FROM ${LOG_SCHEMA}.tickets WHERE expires_at < now())
    INSERT INTO ${LOG_SCHEMA}.tickets (hash, channels, subject, token_expires_at, expires_at)
    VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))`,
  [hashOf(ticket), grant.channels, grant.subject ?? null, grant.tokenExpiresAt ?? null, ttlSeconds])
  return ticket
}

/**
 * Redeems a ticket: the first call with a ticket that has not expired gets
 * its grant; any other call (a second use, a ticket expired or unknown) gets
 * null. The DELETE makes the single use atomic across instances.
 */
export async function redeemTicket (pool: pg.Pool, ticket: string): Promise<TicketGrant | null> {
  const { rows } = await pool.query<{ channels: string[], subject: string | null, token_expires_at: string | null, valid: boolean }>(`
    DELETE FROM ${LOG_SCHEMA}.tickets WHERE hash = $1
    RETURNING channels, subject, token_expires_at::text, expires_at >= now() AS valid`,
  [hashOf(ticket)])
  const row = rows[0]
  if (row === undefined || !row.valid) return null
  return {
    channels: row.channels,
    subject: row.subject ?? undefined,
    tokenExpiresAt: row.token_expires_at === null ? undefined : Number(row.token_expires_at)
  }
}
