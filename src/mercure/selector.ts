import type { EventSelector, EventView } from '../hub.js'
import { encodeComment, encodeRetry } from '../sse.js'
import type { StreamDialect } from '../stream-core.js'
import { mayRead, type MercureGrants } from './authorization.js'
import type { CompiledSelector, TopicMatcher } from './topic-selector.js'
import { decodeUpdatePayload, frameUpdate, type MercureUpdate } from './update.js'

// What an event of the reserved channel is, once per event and delivery:
// every Mercure selector on the channel reuses the update read from the
// view's JSON and its frame.
const updates = new WeakMap<EventView, { update: MercureUpdate, frame: Buffer | undefined } | null>()

function updateOf (view: EventView): { update: MercureUpdate, frame: Buffer | undefined } | null {
  let entry = updates.get(view)
  if (entry === undefined) {
    // Only logged events are updates: a plain NOTIFY on the reserved
    // channel (any role may send one) carries no id and proves nothing.
    const update = view.event.id === undefined ? undefined : decodeUpdatePayload(view.json())
    entry = update === undefined ? null : { update, frame: undefined }
    updates.set(view, entry)
  }
  return entry
}

/**
 * What a Mercure subscriber takes of the reserved channel: the updates one
 * of whose topics matches one of its selectors, private ones only when its
 * grants let it read one of their topics; framed as Mercure frames them
 * (the update's own id, no `event:` without a type). Subscribers with the
 * same selectors and the same subscribe grants have the same key: they
 * share one select() per update, and every subscriber shares the frame.
 */
export class MercureSelector implements EventSelector {
  readonly key: string
  readonly #selectors: readonly CompiledSelector[]
  readonly #grants: MercureGrants
  readonly #matcher: TopicMatcher

  constructor (matcher: TopicMatcher, selectors: readonly CompiledSelector[], grants: MercureGrants) {
    this.#matcher = matcher
    this.#selectors = selectors
    this.#grants = grants
    const names = (list: readonly CompiledSelector[]): string[] => [...new Set(list.map((s) => `${s.type}:${s.value}`))].sort()
    this.key = JSON.stringify(['mercure', names(selectors), names(grants.subscribe)])
  }

  select (view: EventView): Buffer | undefined {
    const entry = updateOf(view)
    if (entry === null) return undefined
    const { update } = entry
    if (!this.#matcher.matchesAny(this.#selectors, update.topics)) return undefined
    if (update.private && !mayRead(this.#matcher, this.#grants, update.topics)) return undefined
    entry.frame ??= frameUpdate(update)
    return entry.frame
  }
}

const HEARTBEAT_OPEN = encodeComment('mercure')

/**
 * How a Mercure stream speaks of itself: a `retry:` and a comment to begin
 * with, and nothing else of the gateway's own: no `gateway/*` event. A
 * discontinuity (events pruned before the stream got them) ends the
 * stream, and the client comes back with the last id it got (Mercure's own
 * mechanism: the `Last-Event-ID` it sends, and the `Mercure-Last-Event-ID`
 * it gets back). An expired token ends the stream without a word.
 */
export const MERCURE_DIALECT: StreamDialect = {
  preamble: (_start, _head, retryMs) => encodeRetry(retryMs) + HEARTBEAT_OPEN,
  missed: () => undefined,
  gap: () => undefined,
  expired: () => undefined
}
