/**
 * The id of an event in the log: an integer from 1 up to MAX_EVENT_ID, in
 * commit order; 0 stands for "before the first event". It travels as its
 * decimal digits in the SSE `id:` field (WHATWG HTML, "Server-sent events",
 * §9.2.6), in `Last-Event-ID` and `lastEventId`, and in the wire between a
 * publishing transaction and the listeners.
 *
 * Every one of those places accepts the same range, parsed here, so that a
 * client never holds an id the gateway would refuse when it resumes.
 * PostgreSQL's bigint goes further, but a JavaScript number is exact only
 * up to 2^53 - 1; the log refuses to draw ids past it (SQLSTATE
 * 23514, from append_checked), which is 285 years of a million events a second.
 */
export type EventId = number

export const MAX_EVENT_ID: EventId = Number.MAX_SAFE_INTEGER

// The digits of MAX_EVENT_ID: a longer run of digits is out of range at once.
const MAX_DIGITS = String(MAX_EVENT_ID).length

/**
 * Reads the decimal digits of an event id (leading zeros allowed, no sign,
 * no spaces). Returns undefined for anything else, or a value past
 * MAX_EVENT_ID. Linear in the input, no regular expression.
 */
export function parseEventId (text: string): EventId | undefined {
  let start = 0
  while (start < text.length - 1 && text.charCodeAt(start) === 0x30) start++
  if (text.length === 0 || text.length - start > MAX_DIGITS) return undefined
  for (let i = start; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c < 0x30 || c > 0x39) return undefined
  }
  const id = Number(text.slice(start))
  return id <= MAX_EVENT_ID ? id : undefined
}
