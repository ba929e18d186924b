// Two real PostgreSQL clusters for failover tests: a primary and a streaming
// replica made from it with `pg_basebackup -R`, run with the server binaries
// of the machine. PostgreSQL refuses to run as root, so as root (the tests
// and CI) every binary runs as the `postgres` user.
import { execFile } from 'node:child_process'
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { chown, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer, type AddressInfo } from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import pg from 'pg'
import { type Teardown, waitFor } from './helper.js'

const run = promisify(execFile)

/** One PostgreSQL cluster of the pair. */
export interface Cluster {
  name: 'primary' | 'replica'
  dataDir: string
  /** TCP port on 127.0.0.1. */
  port: number
  /** `postgres://postgres@127.0.0.1:<port>/postgres`. */
  url: string
}

// The server binaries: PG_BINDIR, else the newest /usr/lib/postgresql/<n>/bin
// (Debian's layout, the machine's and CI's).
function findBinDir (): string | null {
  const wanted = ['initdb', 'pg_ctl', 'pg_basebackup', 'postgres']
  const has = (dir: string): boolean => wanted.every((b) => existsSync(path.join(dir, b)))
  const fromEnv = process.env.PG_BINDIR
  if (fromEnv !== undefined && fromEnv !== '') return has(fromEnv) ? fromEnv : null
  const root = '/usr/lib/postgresql'
  if (!existsSync(root)) return null
  const versions = readdirSync(root).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a))
  for (const v of versions) {
    const dir = path.join(root, v, 'bin')
    if (has(dir)) return dir
  }
  return null
}

const isRoot = process.getuid?.() === 0

function postgresUser (): { uid: number, gid: number } | null {
  try {
    const line = readFileSync('/etc/passwd', 'utf8').split('\n').find((l) => l.startsWith('postgres:'))
    const fields = line?.split(':')
    if (fields === undefined) return null
    return { uid: Number(fields[2]), gid: Number(fields[3]) }
  } catch {
    return null
  }
}

/**
 * Why two clusters cannot be made here, or null if they can: the server
 * binaries (initdb, pg_ctl, pg_basebackup) are missing, or, as root, the
 * `postgres` user or `runuser` is.
 */
export function clustersUnavailable (): string | null {
  if (findBinDir() === null) return 'PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found in PG_BINDIR or /usr/lib/postgresql/<version>/bin'
  if (isRoot && postgresUser() === null) return 'running as root, and there is no postgres user to run PostgreSQL as'
  if (isRoot && !existsSync('/usr/sbin/runuser') && !existsSync('/sbin/runuser')) return 'running as root, and runuser is missing'
  return null
}

/** A free TCP port from the OS (it could be taken again before the server binds it; unlikely in a test). */
async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

/** The LSN as a number of bytes, to compare LSNs (`16/B374D848`). */
function lsnBytes (lsn: string): bigint {
  const [hi, lo] = lsn.split('/')
  return (BigInt(`0x${hi ?? '0'}`) << 32n) + BigInt(`0x${lo ?? '0'}`)
}

/**
 * A primary and a streaming replica of it (asynchronous replication), in a
 * fresh temporary directory, each on a TCP port from the OS with trust
 * authentication. Make one with `startClusters`.
 */
export class ReplicatedClusters {
  readonly primary: Cluster
  readonly replica: Cluster
  readonly #dir: string
  readonly #bin: string
  #removed = false

  constructor (dir: string, bin: string, primary: Cluster, replica: Cluster) {
    this.#dir = dir
    this.#bin = bin
    this.primary = primary
    this.replica = replica
  }

  /** Runs a server binary, as the postgres user when we are root. */
  async run (binary: string, args: string[]): Promise<string> {
    const file = path.join(this.#bin, binary)
    const [command, argv] = isRoot ? ['runuser', ['-u', 'postgres', '--', file, ...args]] : [file, args]
    try {
      const { stdout } = await run(command, argv, { cwd: this.#dir, timeout: 60_000 })
      return stdout
    } catch (err) {
      const { stderr, stdout } = err as { stderr?: string, stdout?: string }
      throw new Error(`${binary} ${args.join(' ')} failed: ${(stderr ?? '').trim() || (stdout ?? '').trim() || (err as Error).message}`)
    }
  }

  /** Starts a cluster's server and waits until it accepts connections. */
  async start (cluster: Cluster): Promise<void> {
    const log = path.join(this.#dir, `${cluster.name}.log`)
    try {
      await this.run('pg_ctl', ['start', '-w', '-t', '60', '-D', cluster.dataDir, '-l', log, '-o', `-p ${cluster.port}`])
    } catch (err) {
      // pg_ctl only says that it failed; the server's log says why.
      const tail = existsSync(log) ? readFileSync(log, 'utf8').split('\n').slice(-20).join('\n') : ''
      throw new Error(`${(err as Error).message}\n${cluster.name}'s log ends with:\n${tail}`)
    }
  }

  /** Stops a cluster's server: `immediate` is a crash (no checkpoint, clients cut), as a lost machine would give. */
  async stop (cluster: Cluster, mode: 'fast' | 'immediate' = 'fast'): Promise<void> {
    await this.run('pg_ctl', ['stop', '-w', '-t', '60', '-m', mode, '-D', cluster.dataDir])
  }

  /** Runs one query on a cluster with a short-lived client. */
  async query<R extends pg.QueryResultRow> (cluster: Cluster, sql: string, values: unknown[] = []): Promise<R[]> {
    const client = new pg.Client({ connectionString: cluster.url })
    await client.connect()
    try {
      return (await client.query<R>(sql, values)).rows
    } finally {
      await client.end()
    }
  }

  /** The primary's current WAL position. */
  async primaryLsn (): Promise<string> {
    const [row] = await this.query<{ lsn: string }>(this.primary, 'SELECT pg_current_wal_lsn()::text AS lsn')
    return row?.lsn as string
  }

  /** The last WAL position the replica has replayed. */
  async replayedLsn (): Promise<string> {
    const [row] = await this.query<{ lsn: string | null }>(this.replica, 'SELECT pg_last_wal_replay_lsn()::text AS lsn')
    return row?.lsn ?? '0/0'
  }

  /** Resolves once the replica has replayed everything the primary had written when called. */
  async waitForReplay (ms = 10_000): Promise<string> {
    const target = await this.primaryLsn()
    let replayed = '0/0'
    await waitFor(async () => lsnBytes(replayed = await this.replayedLsn()) >= lsnBytes(target), `the replica to replay up to ${target}`, ms)
    return replayed
  }

  /** Walreceiver and walsender processes: the replication link as each side sees it. */
  async replicationLink (): Promise<{ receivers: number, senders: number }> {
    const [r] = await this.query<{ n: number }>(this.replica, 'SELECT count(*)::int AS n FROM pg_stat_wal_receiver')
    const [s] = await this.query<{ n: number }>(this.primary, 'SELECT count(*)::int AS n FROM pg_stat_replication')
    return { receivers: r?.n ?? 0, senders: s?.n ?? 0 }
  }

  /**
   * Cuts replication: the replica forgets its primary (`primary_conninfo`
   * set to '' and reloaded), so its walreceiver stops and none is started
   * again; with no `restore_command` it has no other source of WAL. Resolves
   * once neither side shows a replication connection, which proves it.
   */
  async cutReplication (ms = 10_000): Promise<void> {
    await this.query(this.replica, "ALTER SYSTEM SET primary_conninfo = ''")
    await this.query(this.replica, 'SELECT pg_reload_conf()')
    await waitFor(async () => {
      const link = await this.replicationLink()
      return link.receivers === 0 && link.senders === 0
    }, 'the replication link to go', ms)
  }

  /** Promotes the replica to a primary and waits until it accepts writes. */
  async promoteReplica (): Promise<void> {
    await this.run('pg_ctl', ['promote', '-w', '-t', '60', '-D', this.replica.dataDir])
    const [row] = await this.query<{ standby: boolean }>(this.replica, 'SELECT pg_is_in_recovery() AS standby')
    if (row?.standby !== false) throw new Error('the replica is still in recovery after pg_ctl promote')
  }

  /**
   * The timeline a cluster writes on: the first 8 hex digits of its current
   * WAL file's name (the control file's would lag until the next checkpoint).
   */
  async timeline (cluster: Cluster): Promise<number> {
    const [row] = await this.query<{ file: string }>(cluster, 'SELECT pg_walfile_name(pg_current_wal_lsn()) AS file')
    return Number.parseInt((row?.file ?? '').slice(0, 8), 16)
  }

  /** Stops both servers (immediately, ignoring failures) and removes the directory. */
  async destroy (): Promise<void> {
    if (this.#removed) return
    for (const cluster of [this.primary, this.replica]) {
      if (existsSync(path.join(cluster.dataDir, 'postmaster.pid'))) await this.stop(cluster, 'immediate').catch(() => {})
    }
    killPostmasters([this.primary, this.replica])
    await rm(this.#dir, { recursive: true, force: true })
    this.#removed = true
  }

  /** For the process's exit: stops what is left, synchronously. */
  destroySync (): void {
    if (this.#removed) return
    killPostmasters([this.primary, this.replica])
    rmSync(this.#dir, { recursive: true, force: true })
    this.#removed = true
  }
}

// SIGQUIT is an immediate shutdown: the postmaster ends its children and
// exits without a checkpoint.
function killPostmasters (clusters: Cluster[]): void {
  for (const { dataDir } of clusters) {
    try {
      const pid = Number(readFileSync(path.join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0])
      if (pid > 0) process.kill(pid, 'SIGQUIT')
    } catch {}
  }
}

// Small and quick: a test server, not a production one. fsync stays on, so
// that an immediate stop of the primary loses nothing it acknowledged.
const SETTINGS = `
listen_addresses = '127.0.0.1'
unix_socket_directories = '{dir}'
max_connections = 40
shared_buffers = 16MB
wal_level = replica
max_wal_senders = 4
max_replication_slots = 4
hot_standby = on
wal_receiver_status_interval = 1s
logging_collector = off
`

/**
 * Makes a primary and a streaming replica of it, in a fresh temporary
 * directory owned by the postgres user, and tears both down (servers
 * stopped, directory removed) when the test ends, however it ends.
 * Call `clustersUnavailable()` first: this throws if it would say why not.
 */
export async function startClusters (t: Teardown): Promise<ReplicatedClusters> {
  const reason = clustersUnavailable()
  if (reason !== null) throw new Error(reason)
  const bin = findBinDir() as string
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pg-sse-clusters-'))
  const user = postgresUser()
  if (isRoot && user !== null) await chown(dir, user.uid, user.gid)
  const cluster = async (name: Cluster['name']): Promise<Cluster> => {
    const port = await freePort()
    return { name, dataDir: path.join(dir, name), port, url: `postgres://postgres@127.0.0.1:${port}/postgres` }
  }
  const clusters = new ReplicatedClusters(dir, bin, await cluster('primary'), await cluster('replica'))
  t.teardown(() => clusters.destroy())
  const onExit = (): void => clusters.destroySync()
  process.once('exit', onExit)
  t.teardown(() => { process.removeListener('exit', onExit) })

  const { primary, replica } = clusters
  await clusters.run('initdb', ['-D', primary.dataDir, '-U', 'postgres', '--auth=trust', '--no-sync', '--no-instructions', '-E', 'UTF8', '--locale=C'])
  // initdb's pg_hba.conf already lets 127.0.0.1 replicate with trust.
  const conf = path.join(primary.dataDir, 'postgresql.conf')
  await writeFile(conf, readFileSync(conf, 'utf8') + SETTINGS.replace('{dir}', dir))
  if (isRoot && user !== null) await chown(conf, user.uid, user.gid)
  await clusters.start(primary)
  // -R writes standby.signal and primary_conninfo; -X stream copies the WAL
  // written meanwhile; the replica inherits postgresql.conf and takes its
  // own port on the command line.
  await clusters.run('pg_basebackup', ['-h', '127.0.0.1', '-p', String(primary.port), '-U', 'postgres', '-D', replica.dataDir, '-R', '-X', 'stream', '--no-sync'])
  await clusters.start(replica)
  await waitFor(async () => (await clusters.replicationLink()).receivers > 0, 'the replica to stream from the primary')
  return clusters
}
