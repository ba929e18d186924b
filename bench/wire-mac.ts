// `node --import tsx bench/wire-mac.ts`: what the authenticated wire (schema
// version 6) costs. In PostgreSQL: pgbench runs publish_batch on a log at
// schema 5 (no MAC) and on one at schema 6 (HMAC-SHA-256 per event), in
// turns, for single events and batches of 100. In the gateway: how long the
// listener takes to verify one notification.
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { decodeNotification, encodeNotification } from '../src/event-log.js'
import { logAt, pgbench, ROUNDS } from './pgbench.js'

const dir = mkdtempSync(path.join(tmpdir(), 'wire-mac-'))
const scripts = {
  single: path.join(dir, 'single.sql'),
  batch100: path.join(dir, 'batch100.sql')
}
writeFileSync(scripts.single, "SELECT sse_gateway.publish('bench', repeat('x', 64));\n")
writeFileSync(scripts.batch100, "SELECT sse_gateway.publish_batch(array_fill('bench'::text, ARRAY[100]), array_fill(repeat('x', 64), ARRAY[100]));\n")

const logs = { v5: await logAt('pgsse_bench_wire_v5', 5), v6: await logAt('pgsse_bench_wire_v6', 6) }
for (const [name, script] of Object.entries(scripts)) {
  const tps: Record<string, number[]> = { v5: [], v6: [] }
  for (let round = 0; round < ROUNDS; round++) {
    for (const version of ['v5', 'v6'] as const) tps[version]?.push(pgbench(logs[version], script))
  }
  const events = name === 'batch100' ? 100 : 1
  const line = (v: string): string => (tps[v] ?? []).map((x) => Math.round(x * events)).join(' / ')
  process.stdout.write(`${name}: events/s without MAC ${line('v5')}; with MAC ${line('v6')}\n`)
}

const key = Buffer.alloc(32, 7)
for (const size of [64, 1024, 7900]) {
  const data = 'x'.repeat(size)
  const payload = encodeNotification(key, 123456789, 'bench', data)
  const n = 200_000
  for (let i = 0; i < 10_000; i++) decodeNotification('bench', payload, key)
  const start = process.hrtime.bigint()
  for (let i = 0; i < n; i++) decodeNotification('bench', payload, key)
  const ns = Number(process.hrtime.bigint() - start) / n
  process.stdout.write(`verify one ${size}-byte event: ${(ns / 1000).toFixed(2)} µs\n`)
}
