import pg from 'pg'
import t from 'tap'
import { migrate } from '../src/event-log.js'
import { isTicket, issueTicket, redeemTicket, TICKET_PREFIX } from '../src/tickets.js'
import { connect, createDatabase } from './helper.js'
import type { Test } from './helper.js'

async function pool (t: Test): Promise<pg.Pool> {
  const url = await createDatabase(t)
  const client = await connect(t, url)
  await migrate(client)
  const pool = new pg.Pool({ connectionString: url, max: 10 })
  t.teardown(() => pool.end())
  return pool
}

t.test('a ticket is redeemed once, with its grant', async (t) => {
  const db = await pool(t)
  const grant = { channels: ['a', 'b'], subject: 'alice', tokenExpiresAt: 2_000_000_000 }
  const ticket = await issueTicket(db, grant, 30)
  t.ok(isTicket(ticket))
  t.ok(ticket.startsWith(TICKET_PREFIX))
  t.notOk(isTicket('eyJhbGciOiJIUzI1NiJ9.e30.x'), 'a JWT is no ticket')
  t.same(await redeemTicket(db, ticket), grant)
  t.equal(await redeemTicket(db, ticket), null, 'a second time: nothing')
  t.equal(await redeemTicket(db, `${TICKET_PREFIX}unknown`), null)
  const anonymous = await issueTicket(db, { channels: ['p'], subject: undefined, tokenExpiresAt: undefined }, 30)
  t.same(await redeemTicket(db, anonymous), { channels: ['p'], subject: undefined, tokenExpiresAt: undefined })
})

t.test('concurrent redemptions of one ticket: exactly one wins', async (t) => {
  const db = await pool(t)
  for (let round = 0; round < 5; round++) {
    const ticket = await issueTicket(db, { channels: ['race'], subject: undefined, tokenExpiresAt: undefined }, 30)
    const results = await Promise.all(Array.from({ length: 8 }, async () => await redeemTicket(db, ticket)))
    t.equal(results.filter((r) => r !== null).length, 1, `round ${round}: one grant`)
  }
})

t.test('an expired ticket redeems nothing and is deleted', async (t) => {
  const db = await pool(t)
  const ticket = await issueTicket(db, { channels: ['a'], subject: undefined, tokenExpiresAt: undefined }, 30)
  await db.query("UPDATE sse_gateway.tickets SET expires_at = now() - interval '1 second'")
  t.equal(await redeemTicket(db, ticket), null)
  const { rows } = await db.query('SELECT count(*)::int AS n FROM sse_gateway.tickets')
  t.equal(rows[0].n, 0)
})
