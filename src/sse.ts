// SSE framing in one place. We frame events ourselves instead of using
// fastify-sse-v2 (4.2.2), which serves only the operator's status stream
// (src/routes/status-stream.ts), where its limits cannot bite:
// - it drops an event whose data is empty (`if (chunk.data)`): the browser
//   still takes its `id:`, so lastEventId moves past an event it never saw;
// - it splits data on LF only. A CRLF inside data is still framed right
//   (the CR ends up before the LF: one line end), but a lone CR is written
//   raw, and the browser reads it as a line end: "ok\rid: 999" becomes a
//   data line "ok" and a field "id: 999". Payloads inject `id:`, `event:`
//   and `retry:` fields (its open security issue #110);
// - it serializes and queues each event once per client, without bound
//   behind a stalled client, at 5.5 to 8.0 times our CPU time per delivery
//   (an earlier session measured 8.8 to 9.4) and ~7.5 KB more heap per
//   stream: `node --import tsx bench/sse-v2.ts`, 1,000 clients × 200
//   events over loopback (README "Choices worth knowing").
// Here an event is encoded once, each CR, LF or CRLF of its data starting a
// new `data:` line, and the same Buffer is written to every stream.

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
