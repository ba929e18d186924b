// The publish load: wrk (C, from Debian's packages), so that the gateway's
// POSTs are driven as lightly as pgbench drives PostgreSQL. The bench's own
// Node client would cost about as much CPU as the gateway on a 2-core
// machine (it made 2,300 POSTs/s where wrk made 4,000-4,800 of the same).
import { execFileSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { aptInstall } from './targets.js'

export interface WrkRun {
  perSecond: number
  requests: number
  /** Answers that were not 2xx or 3xx. */
  failures: number
}

export interface WrkOptions {
  url: string
  headers: Record<string, string>
  body: string
  seconds: number
  connections: number
  threads: number
}

export function ensureWrk (log: (line: string) => void): void {
  if (existsSync('/usr/bin/wrk')) return
  aptInstall(['wrk'], log)
}

/** POSTs `body` back to back for `seconds` on `connections` keep-alive connections. */
export function runWrk ({ url, headers, body, seconds, connections, threads }: WrkOptions): WrkRun {
  const dir = mkdtempSync(join(tmpdir(), 'pgsse-bench-wrk-'))
  try {
    const script = join(dir, 'post.lua')
    // JSON strings are valid Lua strings for what the bench sends (ASCII).
    writeFileSync(script, [
      'wrk.method = "POST"',
      `wrk.body = ${JSON.stringify(body)}`,
      ...Object.entries(headers).map(([name, value]) => `wrk.headers[${JSON.stringify(name)}] = ${JSON.stringify(value)}`)
    ].join('\n') + '\n')
    const out = execFileSync('/usr/bin/wrk', ['-t', String(threads), '-c', String(connections), '-d', `${seconds}s`, '-s', script, url]).toString()
    const requests = Number(/(\d+) requests in/.exec(out)?.[1] ?? NaN)
    const failures = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0)
    const perSecond = Number(/Requests\/sec:\s+([0-9.]+)/.exec(out)?.[1] ?? NaN)
    return { perSecond: perSecond * (requests - failures) / requests, requests, failures }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
