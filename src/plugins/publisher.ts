import { createHash } from 'node:crypto'
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { BadRequestError, ConflictError, UnavailableError } from '../errors.js'
import { type EventToPublish, IdempotencyConflictError, type IdempotencyKey, type PublishResult } from '../event-log.js'
import { GroupPublisher, type GroupPublisherOptions, nothingPublished } from '../group-publisher.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Publishes through the pool, committing concurrent publishes together. */
    publisher: GroupPublisher
    /**
     * Publishes a request's events, authorized beforehand, atomically;
     * resolves with their ids, in order, only after COMMIT succeeded. A
     * request with an Idempotency-Key publishes once: a repeat (same client,
     * same key, same events) gets the first ids back. Throws 400 for a bad
     * key or a value the database refused, 409 for a key reused with other
     * events, 503 when the commit failed (saying whether anything may have
     * been published).
     */
    publishAll (request: FastifyRequest, events: readonly EventToPublish[]): Promise<string[]>
  }
}

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/

/** The group publisher, on the pool of @fastify/postgres, and publishAll. */
export default fp<GroupPublisherOptions>(async function publisherPlugin (app, options) {
  const publisher = new GroupPublisher(app.pg.pool, options)
  app.decorate('publisher', publisher)
  // Before the pool ends (onClose hooks run last-registered first): publishes
  // already handed over get their answer from the database.
  app.addHook('onClose', async () => {
    await publisher.drain()
    publisher.close()
  })

  function idempotencyKey (request: FastifyRequest, events: readonly EventToPublish[]): IdempotencyKey | undefined {
    const header = request.headers['idempotency-key']
    if (header === undefined) return undefined
    if (typeof header !== 'string' || !IDEMPOTENCY_KEY.test(header)) {
      throw new BadRequestError('Idempotency-Key must be 1 to 255 visible ASCII characters')
    }
    // Keys are the client's own: scoped to the identity of its token (its
    // iss and sub, or the token itself without a sub), never shared.
    const client = app.clientIdentity(request)
    // Publishing was authorized with a token: it has one.
    if (client === undefined) throw new Error('a publish without a verified token')
    return {
      key: JSON.stringify([client, header]),
      requestHash: createHash('sha256').update(JSON.stringify(events)).digest('base64url')
    }
  }

  app.decorate('publishAll', async function publishAll (request: FastifyRequest, events: readonly EventToPublish[]): Promise<string[]> {
    const idempotency = idempotencyKey(request, events)
    let result: PublishResult
    try {
      result = idempotency === undefined
        ? { ids: await publisher.publish(events), replayed: false }
        : await publisher.publishIdempotent(events, idempotency)
    } catch (err) {
      if (err instanceof IdempotencyConflictError) throw new ConflictError(err.message)
      const code = (err as { code?: unknown }).code
      // Class 22 is "data exception": the database refused a value.
      if (typeof code === 'string' && code.startsWith('22')) {
        throw new BadRequestError('the database refused the event: nothing was published')
      }
      app.log.error({ err: { message: (err as Error).message, code } }, 'publish failed')
      if (!nothingPublished(err)) {
        throw new UnavailableError('the database did not confirm the commit: the events may or may not have been published; retry with an Idempotency-Key to publish them at most once')
      }
      throw new UnavailableError('the event could not be committed: nothing was published; retry shortly')
    }
    if (result.replayed) {
      request.log.info('idempotent repeat: nothing published')
    } else {
      app.metrics.eventsPublished.inc(result.ids.length)
    }
    return result.ids
  })
}, { name: 'publisher', dependencies: ['@fastify/postgres', 'gateway-metrics', 'gateway-auth'] })
