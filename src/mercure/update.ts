import { v7 as uuidv7 } from 'uuid'
import { encodeEvent } from '../sse.js'

/*
 * A Mercure update: what a publisher sends (a form, or a call of
 * sse_gateway.mercure_publish), how it is kept in the event log (a JSON
 * payload on the reserved channel MERCURE_CHANNEL), and how it is framed
 * for a subscriber.
 */

/**
 * The one gateway channel every Mercure update is logged and NOTIFYed on.
 * It has a `/`, which no channel name may have: no `GET /events` or
 * `POST /channels` can name it.
 */
export const MERCURE_CHANNEL = 'mercure/updates'

/** An update as logged: its fields as the publisher gave them, its id as given or made. */
export interface MercureUpdate {
  /** The SSE `id:`: the publisher's (any text, may repeat) or `urn:uuid:` + a UUIDv7. */
  id: string
  /** The canonical topic first, then the alternate ones; at least one. */
  topics: string[]
  data: string
  private: boolean
  /** The SSE `event:`; none when undefined. */
  type?: string | undefined
  /** The SSE `retry:` (ms). */
  retry?: number | undefined
}

/** A publish refused for what it holds (400), or for its size (413). */
export class InvalidUpdateError extends Error {
  override name = 'InvalidUpdateError'
  constructor (message: string, readonly statusCode: 400 | 413 = 400) {
    super(message)
  }
}

/** An id made by the hub: `urn:uuid:` and a UUIDv7 (RFC 9562), which sorts by time. */
export function newUpdateId (): string {
  return `urn:uuid:${uuidv7()}`
}

// C0 and C1 controls, DEL, and the Unicode format characters (Cf): what
// Mercure 1.0 refuses in topics, ids and types. CR, LF and NUL among them
// would inject SSE fields.
const CONTROL_OR_FORMAT = /[\p{Cc}\p{Cf}]/u

export interface UpdateLimits {
  /** Topics one update may have. */
  maxTopics: number
  /** The longest topic, id or type, in characters. */
  maxFieldLength: number
  /** The hub's URL: no topic may address its path or what lies below it. */
  hubUrl: string
}

function checkText (name: string, value: string, limits: UpdateLimits): void {
  if (value.length > limits.maxFieldLength) throw new InvalidUpdateError(`a ${name} may have at most ${limits.maxFieldLength} characters`, 413)
  if (CONTROL_OR_FORMAT.test(value)) throw new InvalidUpdateError(`a ${name} may not contain control or format characters`)
}

/**
 * Whether a topic's path has a dot segment (`.` or `..`, plain or
 * percent-encoded, between `/` or `\\`, which URL parsers read as `/`):
 * publish grants are matched against the topic as written, URL patterns
 * against the topic resolved, so `/public/../secret` would pass a grant of
 * `/public/{+x}` and reach subscribers of `/secret`. Mercure's topics are
 * identifiers, never such paths: they are refused.
 */
export function hasDotSegment (topic: string): boolean {
  let end = topic.length
  for (const mark of ['?', '#']) {
    const at = topic.indexOf(mark)
    if (at >= 0 && at < end) end = at
  }
  for (const segment of topic.slice(0, end).replaceAll('\\', '/').split('/')) {
    const plain = segment.toLowerCase().replaceAll('%2e', '.')
    if (plain === '.' || plain === '..') return true
  }
  return false
}

/**
 * Whether a topic addresses the hub's reserved namespace (its URL's path,
 * or below it), resolved against the hub's URL with dot segments removed
 * and unreserved characters decoded, as Mercure 1.0 says: subscription
 * events live there, and only the hub publishes them.
 */
export function addressesHub (topic: string, hubUrl: string): boolean {
  let path: string
  try {
    path = new URL(topic, hubUrl).pathname
  } catch {
    return false
  }
  // The URL parser removed dot segments; decode what RFC 3986 says is the
  // same unencoded (unreserved characters), then compare.
  const normalized = path.replace(/%([0-9A-Fa-f]{2})/g, (escape, hex: string) => {
    const c = String.fromCharCode(parseInt(hex, 16))
    return /[A-Za-z0-9\-._~]/.test(c) ? c : escape.toUpperCase()
  })
  const hubPath = new URL(hubUrl).pathname.replace(/\/$/, '')
  return normalized === hubPath || normalized.startsWith(`${hubPath}/`)
}

/**
 * Reads a publish form (`application/x-www-form-urlencoded`, the fields of
 * both Mercure generations): `topic` (one or more), `data`, `private`
 * (present = private, whatever its value), `id`, `type`, `retry`; other
 * fields are ignored. The id is kept as given, or made (newUpdateId).
 * Throws InvalidUpdateError: 400 for a missing topic, a topic `*` or under
 * the hub's path, an id that starts with `#` or is `earliest`, a type
 * `mercure`, a retry that is not digits, control characters; 413 for too
 * many topics or too long a field.
 */
export function parsePublishForm (body: string, limits: UpdateLimits): MercureUpdate {
  const form = new URLSearchParams(body)
  const topics = form.getAll('topic')
  if (topics.length === 0) throw new InvalidUpdateError('an update needs at least one topic')
  if (topics.length > limits.maxTopics) throw new InvalidUpdateError(`an update may have at most ${limits.maxTopics} topics`, 413)
  for (const topic of topics) {
    checkText('topic', topic, limits)
    if (topic === '*') throw new InvalidUpdateError('the topic * is reserved: it matches every topic')
    if (addressesHub(topic, limits.hubUrl)) throw new InvalidUpdateError('topics under the hub\'s own path are reserved for the hub')
    if (hasDotSegment(topic)) throw new InvalidUpdateError('a topic may not have . or .. path segments (plain or percent-encoded): resolved, it would name another topic than the one authorized')
  }
  const id = form.get('id') ?? undefined
  if (id !== undefined) {
    checkText('id', id, limits)
    if (id === '' || id.startsWith('#') || id === 'earliest') throw new InvalidUpdateError('an id may not be empty, start with # or be "earliest"')
  }
  const type = form.get('type') ?? undefined
  if (type !== undefined) {
    checkText('type', type, limits)
    if (type === 'mercure') throw new InvalidUpdateError('the type "mercure" is reserved for the hub\'s own events')
  }
  const retryText = form.get('retry') ?? undefined
  let retry: number | undefined
  if (retryText !== undefined) {
    if (!/^[0-9]{1,10}$/.test(retryText)) throw new InvalidUpdateError('retry must be a number of milliseconds, in digits')
    retry = Number(retryText)
  }
  const data = form.get('data') ?? ''
  if (data.includes('\0')) throw new InvalidUpdateError('data may not contain NUL (U+0000): PostgreSQL text cannot hold it')
  return {
    id: id ?? newUpdateId(),
    topics,
    data,
    private: form.has('private'),
    type: type === '' ? undefined : type,
    retry
  }
}

/** The update as a log payload: JSON with its fields. */
export function encodeUpdatePayload (update: MercureUpdate): string {
  const payload: Record<string, unknown> = { id: update.id, topics: update.topics, data: update.data, private: update.private }
  if (update.type !== undefined) payload.type = update.type
  if (update.retry !== undefined) payload.retry = update.retry
  return JSON.stringify(payload)
}

const SAFE_FIELD = /^[^\r\n\0]*$/

/**
 * Reads a log payload back (its JSON already parsed): undefined for
 * anything that is not an update, or whose id or type could inject SSE
 * fields (a row written by hand on the reserved channel).
 */
export function decodeUpdatePayload (json: unknown): MercureUpdate | undefined {
  if (typeof json !== 'object' || json === null) return undefined
  const { id, topics, data, private: isPrivate, type, retry } = json as Record<string, unknown>
  if (typeof id !== 'string' || !SAFE_FIELD.test(id)) return undefined
  if (!Array.isArray(topics) || topics.length === 0 || !topics.every((t) => typeof t === 'string')) return undefined
  if (typeof data !== 'string') return undefined
  // A `private` that is not a boolean (a row written by hand) is no update:
  // read as false, "true" or 1 would make a private update public.
  if (isPrivate !== undefined && isPrivate !== null && typeof isPrivate !== 'boolean') return undefined
  if (type !== undefined && type !== null && (typeof type !== 'string' || !SAFE_FIELD.test(type))) return undefined
  if (retry !== undefined && retry !== null && !(Number.isInteger(retry) && (retry as number) >= 0)) return undefined
  return {
    id,
    topics: topics as string[],
    data,
    private: isPrivate === true,
    type: typeof type === 'string' && type !== '' ? type : undefined,
    retry: typeof retry === 'number' ? retry : undefined
  }
}

/**
 * The update as an SSE event: `retry:` when set, `id:`, `event:` only when
 * it has a type (so that `onmessage` gets untyped updates), and `data:`
 * split on CR, LF and CRLF.
 */
export function frameUpdate (update: MercureUpdate): Buffer {
  const retry = update.retry === undefined ? '' : `retry: ${update.retry}\n`
  return Buffer.from(retry + encodeEvent({ id: update.id, event: update.type, data: update.data }))
}
