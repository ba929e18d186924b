// The two servers under test, started and stopped by the bench: the gateway
// (built, as its own process, on a fresh database) and Nchan (Debian's nginx
// and libnginx-mod-nchan, one worker, on loopback).
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { createSigner } from 'fast-jwt'
import pg from 'pg'

/** What the load generator needs to know of a server. */
export interface Target {
  name: string
  host: string
  port: number
  /** The process whose memory is measured. */
  pid: number
  subscribePath (channel: string): string
  subscribeHeaders: Record<string, string>
  /** Method, path and headers of a single-event publish; the body is the payload. */
  publishRequest (channel: string): { path: string, headers: Record<string, string> }
  /** The body of a single-event publish, when it is not the payload itself. */
  publishBody?: (channel: string, payload: string) => string
  /** A publish of several events in one request, where the server has one. */
  publishBatchRequest?: (channel: string, payloads: string[]) => { path: string, headers: Record<string, string>, body: string }
  stop (): Promise<void>
}

export function rssBytes (pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const match = /VmRSS:\s+(\d+) kB/.exec(status)
  return match === null ? NaN : Number(match[1]) * 1024
}

// Whatever happens to the bench, the servers it started do not outlive it.
const children = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL')
})

async function waitForPort (port: number, what: string, child?: ChildProcess): Promise<void> {
  const deadline = Date.now() + 30_000
  for (;;) {
    if (child?.exitCode !== null && child?.exitCode !== undefined) throw new Error(`${what} exited with ${child.exitCode}`)
    try {
      const res = await fetch(`http://127.0.0.1:${port}/`)
      await res.arrayBuffer()
      return
    } catch {}
    if (Date.now() > deadline) throw new Error(`${what} did not start on port ${port}`)
    await sleep(100)
  }
}

async function stopChild (child: ChildProcess): Promise<void> {
  children.delete(child)
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
  await exited
  clearTimeout(timer)
}

// ---- gateway -------------------------------------------------------------

export interface GatewayTarget extends Target {
  databaseUrl: string
  /** A token that may publish and subscribe on every channel, and read /metrics. */
  token: string
  /** The gateway's Prometheus metrics as text. */
  metrics (): Promise<string>
  /** process.memoryUsage() of the gateway after a full GC; with a path, a heap snapshot is written there first. */
  memory (snapshotPath?: string): Promise<NodeJS.MemoryUsage>
}

export interface GatewayOptions {
  adminUrl: string
  port: number
  env?: Record<string, string>
  /** Extra node flags, e.g. --cpu-prof. */
  nodeArgs?: string[]
  log: (line: string) => void
}

export async function startGateway ({ adminUrl, port, env = {}, nodeArgs = [], log }: GatewayOptions): Promise<GatewayTarget> {
  const name = `pgsse_bench_${process.pid}_${randomBytes(3).toString('hex')}`
  const admin = new pg.Client({ connectionString: adminUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const databaseUrl = url.toString()
  const secret = randomBytes(32).toString('base64url')
  // The heap probe answers the bench over IPC (bench/heap-probe.mjs).
  const child = spawn(process.execPath, ['--expose-gc', '--import', './bench/heap-probe.mjs', ...nodeArgs, 'dist/server.js'], {
    env: {
      ...process.env,
      DATABASE_URL: databaseUrl,
      JWT_SECRET: secret,
      HOST: '127.0.0.1',
      PORT: String(port),
      LOG_LEVEL: 'warn',
      // Every client of the bench is on loopback: lift the per-address and
      // publish-rate limits, which would otherwise refuse it.
      MAX_STREAMS_PER_IP: '1000000',
      MAX_STREAMS: '1000000',
      PUBLISH_RATE_MAX: '1000000000',
      ...env
    },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc']
  })
  children.add(child)
  try {
    await waitForPort(port, 'the gateway', child)
  } catch (err) {
    await stopChild(child)
    throw err
  }
  // The mercure claim: the same token publishes and subscribes on the Mercure hub.
  const token = createSigner({ key: secret, algorithm: 'HS256', expiresIn: '2h' })({ sub: 'bench', publish: ['*'], subscribe: ['*'], admin: true, mercure: { publish: ['*'], subscribe: ['*'] } })
  log(`gateway: pid ${child.pid ?? '?'}, database ${name}`)
  return {
    name: 'gateway',
    host: '127.0.0.1',
    port,
    pid: child.pid as number,
    databaseUrl,
    token,
    subscribePath: (channel) => `/events?channel=${channel}`,
    subscribeHeaders: { Authorization: `Bearer ${token}` },
    publishRequest: (channel) => ({ path: `/channels/${channel}`, headers: { 'content-type': 'text/plain', authorization: `Bearer ${token}` } }),
    publishBatchRequest: (channel, payloads) => ({
      path: '/events',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify({ events: payloads.map((data) => ({ channel, data })) })
    }),
    async metrics () {
      const res = await fetch(`http://127.0.0.1:${port}/metrics`, { headers: { authorization: `Bearer ${token}` } })
      return await res.text()
    },
    async memory (snapshotPath) {
      const answer = new Promise<NodeJS.MemoryUsage>((resolve) => child.once('message', (m) => resolve(m as NodeJS.MemoryUsage)))
      child.send(snapshotPath === undefined ? { type: 'memory' } : { type: 'snapshot', path: snapshotPath })
      return await answer
    },
    async stop () {
      await stopChild(child)
      const admin = new pg.Client({ connectionString: adminUrl })
      await admin.connect()
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
      await admin.end()
    }
  }
}

/** pgbench from the PATH, or from Debian's PostgreSQL server packages. */
export function pgbenchPath (): string {
  try {
    execFileSync('pgbench', ['--version'], { stdio: 'ignore' })
    return 'pgbench'
  } catch {}
  const dir = '/usr/lib/postgresql'
  const versions = existsSync(dir) ? readdirSync(dir).sort((a, b) => Number(b) - Number(a)) : []
  for (const v of versions) if (existsSync(`${dir}/${v}/bin/pgbench`)) return `${dir}/${v}/bin/pgbench`
  throw new Error('pgbench not found: install postgresql-client (or the PostgreSQL server package)')
}

// ---- Nchan ---------------------------------------------------------------

const NCHAN_MODULE = '/usr/lib/nginx/modules/ngx_nchan_module.so'

/** Installs Debian packages with apt-get (updating the index if the first try fails). */
export function aptInstall (packages: string[], log: (line: string) => void): void {
  log(`installing ${packages.join(' and ')} with apt-get`)
  const run = (args: string[]): void => { execFileSync('apt-get', args, { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } }) }
  try {
    run(['install', '-y', '--no-install-recommends', ...packages])
  } catch {
    run(['update'])
    run(['install', '-y', '--no-install-recommends', ...packages])
  }
}

/** Installs nginx and Nchan from Debian's packages when they are missing. */
export function ensureNchan (log: (line: string) => void): void {
  if (existsSync('/usr/sbin/nginx') && existsSync(NCHAN_MODULE)) return
  aptInstall(['nginx', 'libnginx-mod-nchan'], log)
}

export async function startNchan ({ port, log }: { port: number, log: (line: string) => void }): Promise<Target> {
  ensureNchan(log)
  const prefix = join(tmpdir(), `pgsse-bench-nchan-${process.pid}`)
  mkdirSync(join(prefix, 'logs'), { recursive: true })
  const conf = join(prefix, 'nginx.conf')
  writeFileSync(conf, `
load_module ${NCHAN_MODULE};
daemon off;
master_process on;
worker_processes 1;
# Nchan counts more than the client sockets against worker_connections: at
# 19,000 it held 17,812 streams of 18,000. (Raising the file limit past the
# hard one needs root; nginx goes on without it otherwise.)
worker_rlimit_nofile 40000;
error_log ${prefix}/logs/error.log warn;
pid ${prefix}/nginx.pid;
events {
  worker_connections 30000;
  multi_accept on;
}
http {
  access_log off;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  fastcgi_temp_path ${prefix}/fastcgi;
  uwsgi_temp_path ${prefix}/uwsgi;
  scgi_temp_path ${prefix}/scgi;
  nchan_shared_memory_size 512M;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:${port} backlog=4096;
    location = / { return 200 'ok'; }
    location /sub/ {
      nchan_subscriber eventsource;
      nchan_channel_id $arg_channel;
      nchan_subscriber_first_message newest;
    }
    location /pub {
      nchan_publisher;
      nchan_channel_id $arg_channel;
      nchan_message_buffer_length 2000;
      nchan_message_timeout 5m;
    }
  }
}
`)
  const child = spawn('/usr/sbin/nginx', ['-p', prefix, '-c', conf, '-e', `${prefix}/logs/error.log`], { stdio: ['ignore', 'inherit', 'inherit'] })
  children.add(child)
  await waitForPort(port, 'nginx', child)
  // The one worker is the process that holds the streams.
  let workerPid = NaN
  for (let i = 0; i < 50 && Number.isNaN(workerPid); i++) {
    const children = execFileSync('ps', ['--ppid', String(child.pid), '-o', 'pid=']).toString().trim().split(/\s+/).filter(Boolean)
    if (children.length > 0) workerPid = Number(children[0])
    else await sleep(100)
  }
  log(`nchan: nginx master ${child.pid ?? '?'}, worker ${workerPid}`)
  return {
    name: 'nchan',
    host: '127.0.0.1',
    port,
    pid: workerPid,
    subscribePath: (channel) => `/sub/?channel=${channel}`,
    subscribeHeaders: {},
    publishRequest: (channel) => ({ path: `/pub?channel=${channel}`, headers: { 'content-type': 'text/plain' } }),
    async stop () {
      await stopChild(child)
    }
  }
}

/**
 * The gateway's Mercure hub as a target: a channel name becomes a topic,
 * subscribed with one `topic=` selector and published as a form.
 */
export function mercureTarget (gateway: GatewayTarget): Target {
  const authorization = `Bearer ${gateway.token}`
  return {
    name: 'gateway (Mercure)',
    host: gateway.host,
    port: gateway.port,
    pid: gateway.pid,
    subscribePath: (topic) => `/.well-known/mercure?topic=${encodeURIComponent(topic)}`,
    subscribeHeaders: { Authorization: authorization },
    publishRequest: () => ({ path: '/.well-known/mercure', headers: { 'content-type': 'application/x-www-form-urlencoded', authorization } }),
    publishBody: (topic, payload) => new URLSearchParams({ topic, data: payload }).toString(),
    stop: async () => {}
  }
}
