// SSE framing in one place. We frame events ourselves instead of using
// fastify-sse-v2: its serializer drops an event whose data is empty
// (`if (chunk.data)`), splits data on LF only (a CR or CRLF in a payload
// would be read by the browser as a line break it never sent), and encodes
// each event once per client through an unbounded queue. Here an event is
// encoded once and the same Buffer is written to every stream.

// The line terminators of the event-stream grammar: CRLF, lone CR, lone LF.
const LINE_BREAK = /\r\n|\r|\n/

export interface SseEvent {
  id?: string | undefined
  event?: string | undefined
  data: string
}

/**
 * Frames one event. `id` and `event` must not contain CR, LF or NUL (event
 * ids are digits and event names are validated channel names); `data` may
 * contain anything: each of its lines becomes one `data:` field, so the
 * client reassembles it exactly, line breaks as LF.
 */
export function encodeEvent ({ id, event, data }: SseEvent): string {
  let frame = ''
  if (id !== undefined) frame += `id: ${id}\n`
  if (event !== undefined) frame += `event: ${event}\n`
  for (const line of data.split(LINE_BREAK)) frame += `data: ${line}\n`
  return frame + '\n'
}

/** A comment line: clients ignore it, proxies see traffic. */
export function encodeComment (text: string): string {
  return `: ${text.replace(/[\r\n]+/g, ' ')}\n\n`
}

export function encodeRetry (milliseconds: number): string {
  return `retry: ${Math.trunc(milliseconds)}\n\n`
}
