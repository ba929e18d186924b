// `node --import tsx bench/row-capture.ts`: what schema version 7 costs a
// writer, with pgbench, in turns (the machine drifts), ROUNDS rounds of
// SECONDS seconds each, 4 clients on 2 threads:
//  - publishing from SQL: sse_gateway.publish (one 64-byte event per
//    transaction) and publish_batch (100 per transaction) on a log at
//    version 6 (ids drawn at the call) and at version 7 (staged, drawn at
//    commit by a deferred trigger);
//  - writing a table: INSERTs of one row (with synchronous_commit on and
//    off), and of 100 rows per statement, into a table that is not
//    captured and into one that is (sse_gateway.capture_changes).
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { logAt, pgbench, ROUNDS } from './pgbench.js'

const dir = mkdtempSync(path.join(tmpdir(), 'row-capture-'))
function script (name: string, sql: string): string {
  const file = path.join(dir, `${name}.sql`)
  writeFileSync(file, sql + '\n')
  return file
}

/** Runs each script on each database in turns; prints rows/s (tps × rows per transaction). */
function compare (title: string, runs: Array<{ label: string, url: string, script: string, rows: number, options?: string }>): void {
  const rates = new Map<string, number[]>(runs.map((r) => [r.label, []]))
  for (let round = 0; round < ROUNDS; round++) {
    for (const run of runs) rates.get(run.label)?.push(pgbench(run.url, run.script, run.options) * run.rows)
  }
  process.stdout.write(`${title}\n`)
  for (const run of runs) process.stdout.write(`  ${run.label}: ${(rates.get(run.label) ?? []).map((x) => Math.round(x).toLocaleString('en')).join(' / ')}\n`)
}

const tables = `
  CREATE TABLE plain (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL, placed timestamptz NOT NULL DEFAULT now());
  CREATE TABLE captured (LIKE plain INCLUDING ALL);
  SELECT sse_gateway.capture_changes('public.captured');`
const v6 = await logAt('pgsse_bench_rows_v6', 6)
const v7 = await logAt('pgsse_bench_rows_v7', 7, tables)

const publishOne = script('publish', "SELECT sse_gateway.publish('bench', repeat('x', 64));")
const publishBatch = script('publish-batch', "SELECT sse_gateway.publish_batch(array_fill('bench'::text, ARRAY[100]), array_fill(repeat('x', 64), ARRAY[100]));")
compare('sse_gateway.publish, one 64-byte event per transaction: events/s', [
  { label: 'version 6 (ids drawn at the call)', url: v6, script: publishOne, rows: 1 },
  { label: 'version 7 (staged, ids drawn at commit)', url: v7, script: publishOne, rows: 1 }
])
compare('sse_gateway.publish_batch of 100 64-byte events per transaction: events/s', [
  { label: 'version 6', url: v6, script: publishBatch, rows: 100 },
  { label: 'version 7', url: v7, script: publishBatch, rows: 100 }
])

const insert = (table: string): string => script(`insert-${table}`, `INSERT INTO ${table} (status, total) VALUES ('new', 9.5);`)
const insert100 = (table: string): string => script(`insert100-${table}`, `INSERT INTO ${table} (status, total) SELECT 'new', i FROM generate_series(1, 100) AS i;`)
compare('INSERT of one row per transaction: rows/s', [
  { label: 'table not captured', url: v7, script: insert('plain'), rows: 1 },
  { label: 'captured table', url: v7, script: insert('captured'), rows: 1 }
])
// Without the wait for the WAL flush: what the trigger costs in CPU, apart
// from the commits that NOTIFY going one at a time.
compare('INSERT of one row per transaction, synchronous_commit=off: rows/s', [
  { label: 'table not captured', url: v7, script: insert('plain'), rows: 1, options: '-c synchronous_commit=off' },
  { label: 'captured table', url: v7, script: insert('captured'), rows: 1, options: '-c synchronous_commit=off' }
])
compare('INSERT of 100 rows per statement: rows/s', [
  { label: 'table not captured', url: v7, script: insert100('plain'), rows: 100 },
  { label: 'captured table', url: v7, script: insert100('captured'), rows: 100 }
])
