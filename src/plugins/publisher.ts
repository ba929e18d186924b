import fp from 'fastify-plugin'
import { GroupPublisher, type GroupPublisherOptions } from '../group-publisher.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Publishes through the pool, committing concurrent publishes together. */
    publisher: GroupPublisher
  }
}

/** The group publisher, on the pool of @fastify/postgres. */
export default fp<GroupPublisherOptions>(async function publisherPlugin (app, options) {
  const publisher = new GroupPublisher(app.pg.pool, options)
  app.decorate('publisher', publisher)
  // Before the pool ends (onClose hooks run last-registered first): publishes
  // already handed over get their answer from the database.
  app.addHook('onClose', async () => {
    await publisher.drain()
    publisher.close()
  })
}, { name: 'publisher', dependencies: ['@fastify/postgres'] })
