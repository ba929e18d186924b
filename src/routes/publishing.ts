import type { FastifyInstance } from 'fastify'
import { BadRequestError, InvalidChannelError, PayloadTooLargeError, UnavailableError } from '../errors.js'
import { type EventToPublish, publishEvents } from '../event-log.js'
import { CHANNEL_NAME_RULE, isChannelName } from '../channel.js'

export function checkChannelNames (channels: Iterable<string>): void {
  for (const channel of channels) {
    if (!isChannelName(channel)) {
      throw new InvalidChannelError(`invalid channel name ${JSON.stringify(channel)}: use ${CHANNEL_NAME_RULE}`)
    }
  }
}

/**
 * The payload of a batch event: a string is sent verbatim, any other JSON
 * value as compact JSON text.
 */
export function toPayload (data: unknown, maxBytes: number, what: string): string {
  const payload = typeof data === 'string' ? data : JSON.stringify(data)
  checkPayload(payload, maxBytes, what)
  return payload
}

export function checkPayload (payload: string, maxBytes: number, what: string): void {
  if (Buffer.byteLength(payload) > maxBytes) {
    throw new PayloadTooLargeError(`${what} is larger than ${maxBytes} bytes`)
  }
  // PostgreSQL text cannot hold NUL.
  if (payload.includes('\u0000')) {
    throw new BadRequestError(`${what} must not contain the NUL character`)
  }
}

/** Publishes in one transaction; 201 only after COMMIT succeeded. */
export async function publishAll (app: FastifyInstance, events: readonly EventToPublish[]): Promise<string[]> {
  let ids: string[]
  try {
    ids = await publishEvents(app.pg.pool, events)
  } catch (err) {
    const code = (err as { code?: unknown }).code
    // Class 22 is "data exception": the database refused a value.
    if (typeof code === 'string' && code.startsWith('22')) {
      throw new BadRequestError('the database refused the event: nothing was published')
    }
    app.log.error({ err: { message: (err as Error).message, code } }, 'publish failed')
    throw new UnavailableError('the event could not be committed: nothing was published; retry shortly')
  }
  app.metrics.eventsPublished.inc(ids.length)
  return ids
}
