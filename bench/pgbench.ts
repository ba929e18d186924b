// What the pgbench-driven benches share (bench/wire-mac.ts,
// bench/row-capture.ts): a fresh database with the event log at a given
// schema version, and one pgbench run's rate.
import { execFileSync } from 'node:child_process'
import pg from 'pg'
import { migrate } from '../src/event-log.js'

export const ADMIN_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'
/** Seconds of each pgbench run (SECONDS), and rounds of runs taken in turns (ROUNDS). */
export const SECONDS = Number(process.env.SECONDS ?? 10)
export const ROUNDS = Number(process.env.ROUNDS ?? 3)

/** Creates (again) the database `name` with the log migrated to `version`, runs `setup` in it, and returns its URL. */
export async function logAt (name: string, version: number, setup = ''): Promise<string> {
  const admin = new pg.Client(ADMIN_URL)
  await admin.connect()
  await admin.query(`DROP DATABASE IF EXISTS ${name}`)
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  const url = new URL(ADMIN_URL)
  url.pathname = `/${name}`
  const client = new pg.Client(url.toString())
  await client.connect()
  await migrate(client, version)
  if (setup !== '') await client.query(setup)
  await client.end()
  return url.toString()
}

/** Transactions per second of one pgbench run of `script` (4 clients on 2 threads, SECONDS long); `options` go in PGOPTIONS. */
export function pgbench (url: string, script: string, options = ''): number {
  const out = execFileSync('pgbench', ['-n', '-c', '4', '-j', '2', '-T', String(SECONDS), '-f', script, url], { encoding: 'utf8', env: { ...process.env, PGOPTIONS: options } })
  return Number(/tps = ([0-9.]+)/.exec(out)?.[1] ?? 0)
}
