// How far one PostgreSQL carries many gateway instances: each instance
// holds one listening session, and PostgreSQL (before 19) signals every
// listening session of a database on every NOTIFY, and each reads the whole
// queue. This phase holds 1, 4, 16 and 64 plain pg.Client sessions that
// LISTEN on the bench's channel, as instances would, and measures with them:
// what pgbench commits through the gateway's own functions (one event a
// transaction, and batches of 100), and how long a NOTIFY takes to reach
// every session at a steady rate.
import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'
import { promisify } from 'node:util'
import pg from 'pg'
import { migrate } from '../src/event-log.js'
import { newHistogram, now, quantile, record } from './histogram.js'
import { pgbenchPath } from './targets.js'

export interface ListenerRow {
  listeners: number
  /** Why this count was not measured (the server has no room for its sessions). */
  skipped?: string
  /** Bare `SELECT pg_notify(...)` transactions a second (no WAL flush to wait for: the NOTIFY's own cost), 8 pgbench clients. */
  notifyPerSecond?: number
  /** sse_gateway.publish(...) transactions a second, 8 pgbench clients. */
  singlePerSecond?: number
  /** Events a second in publish_batch(100) transactions, 8 pgbench clients. */
  batchEventsPerSecond?: number
  /** pg_notification_queue_usage() at its highest during the runs. */
  peakQueueUsage?: number
  /** Notifications every session got, of those sent, during the runs. */
  complete?: boolean
  /** From a publish's send (due time, open loop) to its NOTIFY at each session (ms). */
  p50?: number
  p99?: number
  max?: number
}

export interface ListenerScaling {
  pacedRate: number
  rows: ListenerRow[]
}

const execFileAsync = promisify(execFile)
const CHANNEL = 'bench_scale'
const PGBENCH_CLIENTS = 8
const PACED_RATE = 50
const PACED_SECONDS = 5

interface Session {
  client: pg.Client
  received: number
}

export async function measureListenerScaling ({ adminUrl, counts, seconds, log }: { adminUrl: string, counts: number[], seconds: number, log: (line: string) => void }): Promise<ListenerScaling> {
  const pgbench = pgbenchPath()
  const name = `pgsse_bench_scale_${process.pid}_${randomBytes(3).toString('hex')}`
  const admin = new pg.Client({ connectionString: adminUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const databaseUrl = url.toString()
  const result: ListenerScaling = { pacedRate: PACED_RATE, rows: [] }
  const single = '/tmp/pgsse-bench-scale-single.sql'
  const batch = '/tmp/pgsse-bench-scale-batch.sql'
  const notify = '/tmp/pgsse-bench-scale-notify.sql'
  writeFileSync(notify, `SELECT pg_notify('${CHANNEL}', repeat('x', 100));\n`)
  writeFileSync(single, `SELECT sse_gateway.publish('${CHANNEL}', repeat('x', 64));\n`)
  writeFileSync(batch, `SELECT sse_gateway.publish_batch(array_fill('${CHANNEL}'::text, ARRAY[100]), array_fill(repeat('x', 64), ARRAY[100]));\n`)
  // Not execFileSync: the sessions are read on this thread, and must drain
  // what they are sent while pgbench runs.
  const runPgbench = async (script: string): Promise<{ tps: number, transactions: number }> => {
    const { stdout: out } = await execFileAsync(pgbench, ['-n', '-f', script, '-c', String(PGBENCH_CLIENTS), '-j', '2', '-T', String(seconds), databaseUrl])
    return {
      tps: Number(/tps = ([0-9.]+)/.exec(out)?.[1] ?? NaN),
      transactions: Number(/number of transactions actually processed: (\d+)/.exec(out)?.[1] ?? NaN)
    }
  }
  try {
    const db = new pg.Client({ connectionString: databaseUrl })
    await db.connect()
    await migrate(db)
    for (const listeners of counts) {
      // The sessions, pgbench's, the paced publisher's 4, this one and a margin.
      const { rows } = await db.query<{ room: number }>('SELECT current_setting(\'max_connections\')::int - current_setting(\'superuser_reserved_connections\')::int - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = \'client backend\')::int AS room')
      const needed = listeners + PGBENCH_CLIENTS + 4 + 2
      if ((rows[0]?.room ?? 0) < needed) {
        const skipped = `max_connections leaves room for ${rows[0]?.room ?? 0} sessions, ${needed} needed`
        log(`listeners ${listeners}: skipped, ${skipped}`)
        result.rows.push({ listeners, skipped })
        continue
      }
      const sessions: Session[] = []
      let sendTimes = new Float64Array(0)
      const histogram = newHistogram()
      try {
        for (let i = 0; i < listeners; i++) {
          const client = new pg.Client({ connectionString: databaseUrl, application_name: 'pgsse-bench:listener' })
          const session: Session = { client, received: 0 }
          client.on('notification', () => {
            const sent = sendTimes[session.received++]
            if (sent !== undefined && sent > 0) record(histogram, now() - sent)
          })
          await client.connect()
          await client.query(`LISTEN ${CHANNEL}`)
          sessions.push(session)
        }
        // A steady rate, open loop, from 4 connections: the latency to every session.
        const total = PACED_RATE * PACED_SECONDS
        sendTimes = new Float64Array(total)
        const pool = new pg.Pool({ connectionString: databaseUrl, max: 4 })
        const start = now() + 50
        const inFlight: Array<Promise<unknown>> = []
        for (let i = 0; i < total; i++) {
          const due = start + i * 1000 / PACED_RATE
          const wait = due - now()
          if (wait > 1) await sleep(wait - 0.5)
          sendTimes[i] = due
          inFlight.push(pool.query(`SELECT sse_gateway.publish('${CHANNEL}', repeat('x', 64))`))
        }
        await Promise.all(inFlight)
        await pool.end()
        const deadline = Date.now() + 30_000
        while (sessions.some((s) => s.received < total) && Date.now() < deadline) await sleep(20)
        let complete = sessions.every((s) => s.received === total)
        // Then the rates, with every session draining what it is sent.
        for (const s of sessions) s.received = 0
        sendTimes = new Float64Array(0)
        let peak = 0
        let sample: Promise<void> | undefined
        const sampler = setInterval(() => {
          sample ??= db.query<{ usage: number }>('SELECT pg_notification_queue_usage() AS usage').then(({ rows }) => { peak = Math.max(peak, rows[0]?.usage ?? 0) }, () => {}).finally(() => { sample = undefined })
        }, 200)
        const before = await notified(db)
        const bare = await runPgbench(notify)
        const notifyPerSecond = bare.tps
        const singlePerSecond = (await runPgbench(single)).tps
        const batchEventsPerSecond = 100 * (await runPgbench(batch)).tps
        // Every logged event was one NOTIFY, and so was every bare pg_notify.
        clearInterval(sampler)
        await sample
        const sent = await notified(db) - before + bare.transactions
        const drainBy = Date.now() + 60_000
        while (sessions.some((s) => s.received < sent) && Date.now() < drainBy) await sleep(50)
        complete &&= sessions.every((s) => s.received === sent)
        const row: ListenerRow = { listeners, notifyPerSecond, singlePerSecond, batchEventsPerSecond, peakQueueUsage: peak, complete, p50: quantile(histogram, 0.5), p99: quantile(histogram, 0.99), max: quantile(histogram, 1) }
        result.rows.push(row)
        log(`listeners ${listeners}: pg_notify ${notifyPerSecond.toFixed(0)} tps, publish() ${singlePerSecond.toFixed(0)} tps, publish_batch(100) ${batchEventsPerSecond.toFixed(0)} events/s, queue usage peak ${(100 * peak).toFixed(2)}%; NOTIFY latency at ${PACED_RATE}/s p50 ${row.p50?.toFixed(1)} ms, p99 ${row.p99?.toFixed(1)} ms, max ${row.max?.toFixed(1)} ms; every session got every notification: ${complete}`)
      } finally {
        await Promise.all(sessions.map(async (s) => { await s.client.end() }))
      }
    }
    await db.end()
  } finally {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  }
  return result
}

// Events in the log so far.
async function notified (db: pg.Client): Promise<number> {
  const { rows } = await db.query<{ head: string }>('SELECT last_id::text AS head FROM sse_gateway.log_head')
  return Number(rows[0]?.head ?? 0)
}
