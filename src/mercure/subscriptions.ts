import { randomUUID } from 'node:crypto'
import type pg from 'pg'
import { LOG_SCHEMA } from '../event-log.js'
import type { SelectorType } from './topic-selector.js'
import { encodeUpdatePayload, MERCURE_CHANNEL, type MercureUpdate, newUpdateId } from './update.js'

/*
 * Active subscriptions (Mercure's `subscriptions` option), kept in the
 * database so that every instance sees those of all: a row per
 * subscription of a live stream (sse_gateway.mercure_subscriptions), and an
 * update for each one created or ended, logged in the same transaction as
 * the row, so the API and the events never disagree. Each subscription is
 * told in the format of its own generation:
 *
 * - draft-07 (`topic=`): topic `/.well-known/mercure/subscriptions/{topic}/{subscriber}`,
 *   a JSON-LD document (`@context`, `type: "Subscription"`, `topic`);
 * - Mercure 1.0 (`match=`, `match_urlpattern=`): topic
 *   `/.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}`,
 *   a JSON document (`type: "subscription"`, `match_type`, `match`), with
 *   the SSE type `mercure`.
 *
 * Both are private: only subscribers allowed to read their topic get them.
 * An instance renews its row in sse_gateway.mercure_instances; one that
 * stopped without removing its subscriptions (a crash) is swept by the
 * others once it is stale, and its subscriptions are told ended.
 */

export interface Subscription {
  subscriber: string
  type: SelectorType
  match: string
  payload?: unknown
}

export interface SubscriptionRow extends Subscription {
  active: boolean
}

const encode = encodeURIComponent

/** The topic of a subscription's events (and its URL in the API), under the hub's path. */
export function subscriptionTopic (hubPath: string, { subscriber, type, match }: Subscription): string {
  return type === 'legacy'
    ? `${hubPath}/subscriptions/${encode(match)}/${encode(subscriber)}`
    : `${hubPath}/subscriptions/${type}/${encode(match)}/${encode(subscriber)}`
}

/** The document describing a subscription, in its generation's format. */
export function subscriptionDocument (hubPath: string, subscription: Subscription, active: boolean): Record<string, unknown> {
  const id = subscriptionTopic(hubPath, subscription)
  const payload = subscription.payload === undefined || subscription.payload === null ? {} : { payload: subscription.payload }
  return subscription.type === 'legacy'
    ? { '@context': 'https://mercure.rocks/', id, type: 'Subscription', topic: subscription.match, subscriber: subscription.subscriber, active, ...payload }
    : { id, type: 'subscription', match_type: subscription.type, match: subscription.match, subscriber: subscription.subscriber, active, ...payload }
}

/** The update telling that a subscription was created or ended. */
export function subscriptionUpdate (hubPath: string, subscription: Subscription, active: boolean): MercureUpdate {
  return {
    id: newUpdateId(),
    topics: [subscriptionTopic(hubPath, subscription)],
    data: JSON.stringify(subscriptionDocument(hubPath, subscription, active)),
    private: true,
    type: subscription.type === 'legacy' ? undefined : 'mercure'
  }
}

export interface ActiveSubscriptionsOptions {
  pool: pg.Pool
  /** The path of the hub's URL, e.g. `/.well-known/mercure`. */
  hubPath: string
  /** How often this instance says it is alive (ms); it is stale after three times that. */
  heartbeatMs: number
  /** Failures of the background work (heartbeat, sweep). */
  onError: (err: Error) => void
}

interface Row { subscriber: string, match_type: SelectorType, match: string, payload: unknown }

/** This instance's subscriptions in the shared tables, and the view of everyone's. */
export class ActiveSubscriptions {
  /** This instance, as its rows name it. */
  readonly instance = randomUUID()
  readonly #options: ActiveSubscriptionsOptions
  #timer: NodeJS.Timeout | undefined

  constructor (options: ActiveSubscriptionsOptions) {
    this.#options = options
  }

  /** Registers this instance and starts its heartbeat and the sweep of stale instances. */
  async start (): Promise<void> {
    await this.#options.pool.query(`INSERT INTO ${LOG_SCHEMA}.mercure_instances (instance) VALUES ($1)`, [this.instance])
    this.#timer = setInterval(() => {
      this.#beat().catch((err: Error) => this.#options.onError(err))
    }, this.#options.heartbeatMs)
    this.#timer.unref()
  }

  /** Records the subscriptions of a stream and logs their `active: true` updates, in one transaction. */
  async add (subscriptions: readonly Subscription[]): Promise<void> {
    await this.#change(async (client) => {
      const { rows } = await client.query<Row>(
        `INSERT INTO ${LOG_SCHEMA}.mercure_subscriptions (subscriber, match_type, match, payload, instance)
         SELECT s, t, m, p, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[]) AS u(s, t, m, p)
         ON CONFLICT DO NOTHING RETURNING subscriber, match_type, match, payload`,
        [subscriptions.map((s) => s.subscriber), subscriptions.map((s) => s.type), subscriptions.map((s) => s.match),
          subscriptions.map((s) => s.payload === undefined ? null : JSON.stringify(s.payload)), this.instance]
      )
      return rows.map((row) => subscriptionUpdate(this.#options.hubPath, fromRow(row), true))
    })
  }

  /** Removes a stream's subscriptions and logs their `active: false` updates, in one transaction. */
  async remove (subscriber: string): Promise<void> {
    await this.#change(async (client) => {
      const { rows } = await client.query<Row>(
        `DELETE FROM ${LOG_SCHEMA}.mercure_subscriptions WHERE subscriber = $1 RETURNING subscriber, match_type, match, payload`,
        [subscriber]
      )
      return rows.map((row) => subscriptionUpdate(this.#options.hubPath, fromRow(row), false))
    })
  }

  /**
   * The active subscriptions of every instance, optionally of one selector
   * (type and match) and one subscriber; in a stable order.
   */
  async list (filter: { type?: SelectorType, match?: string, subscriber?: string } = {}): Promise<SubscriptionRow[]> {
    const { rows } = await this.#options.pool.query<Row>(
      `SELECT subscriber, match_type, match, payload FROM ${LOG_SCHEMA}.mercure_subscriptions
       WHERE ($1::text IS NULL OR match_type = $1) AND ($2::text IS NULL OR match = $2) AND ($3::text IS NULL OR subscriber = $3)
       ORDER BY created_at, subscriber, match_type, match LIMIT 10000`,
      [filter.type ?? null, filter.match ?? null, filter.subscriber ?? null]
    )
    return rows.map((row) => ({ ...fromRow(row), active: true }))
  }

  /** Removes this instance and its subscriptions (their `active: false` updates logged); stops the heartbeat. */
  async close (): Promise<void> {
    clearInterval(this.#timer)
    await this.#sweep([this.instance])
  }

  // Renews this instance, and sweeps instances not heard of for three beats.
  async #beat (): Promise<void> {
    const { rows } = await this.#options.pool.query<{ instance: string }>(
      `WITH renewed AS (UPDATE ${LOG_SCHEMA}.mercure_instances SET seen_at = now() WHERE instance = $1)
       SELECT instance FROM ${LOG_SCHEMA}.mercure_instances WHERE seen_at < now() - make_interval(secs => $2) AND instance <> $1`,
      [this.instance, 3 * this.#options.heartbeatMs / 1000]
    )
    if (rows.length > 0) await this.#sweep(rows.map((r) => r.instance))
  }

  async #sweep (instances: readonly string[]): Promise<void> {
    await this.#change(async (client) => {
      const { rows } = await client.query<Row>(
        `DELETE FROM ${LOG_SCHEMA}.mercure_subscriptions WHERE instance = ANY($1::uuid[]) RETURNING subscriber, match_type, match, payload`,
        [instances]
      )
      await client.query(`DELETE FROM ${LOG_SCHEMA}.mercure_instances WHERE instance = ANY($1::uuid[])`, [instances])
      return rows.map((row) => subscriptionUpdate(this.#options.hubPath, fromRow(row), false))
    })
  }

  // Changes rows and logs the updates `change` returns, in one transaction.
  async #change (change: (client: pg.PoolClient) => Promise<MercureUpdate[]>): Promise<void> {
    const client = await this.#options.pool.connect()
    let failed: Error | undefined
    try {
      await client.query('BEGIN')
      const updates = await change(client)
      if (updates.length > 0) {
        await client.query(`SELECT ${LOG_SCHEMA}.publish_batch($1::text[], $2::text[])`, [updates.map(() => MERCURE_CHANNEL), updates.map(encodeUpdatePayload)])
      }
      await client.query('COMMIT')
    } catch (err) {
      failed = err as Error
      await client.query('ROLLBACK').catch(() => {})
      throw err
    } finally {
      client.release(failed)
    }
  }
}

function fromRow (row: Row): Subscription {
  return { subscriber: row.subscriber, type: row.match_type, match: row.match, payload: row.payload ?? undefined }
}
