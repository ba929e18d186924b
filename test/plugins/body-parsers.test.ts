import Fastify, { type FastifyInstance } from 'fastify'
import t from 'tap'
import { BATCH_DATA, toPayload } from '../../src/payload.js'
import bodyParsersPlugin from '../../src/plugins/body-parsers.js'
import type { Test } from '../helper.js'

// One app, three routes, each taking its body as its config.body says.
async function app (t: Test): Promise<FastifyInstance> {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(bodyParsersPlugin)
  app.post('/value', async (request) => ({ body: request.body }))
  app.post('/text', { config: { body: { json: 'text' } } }, async (request) => ({ body: request.body }))
  app.post('/batch', { config: { body: { capture: BATCH_DATA, text: false } } }, async (request) => {
    const { events } = request.body as { events: Array<{ data: unknown }> }
    return { payloads: events.map((e) => toPayload(e, 100, 'data')) }
  })
  return app
}

async function post (app: FastifyInstance, url: string, contentType: string, payload: string | Buffer): Promise<{ status: number, body: unknown }> {
  const res = await app.inject({ method: 'POST', url, headers: { 'content-type': contentType }, payload })
  return { status: res.statusCode, body: res.json() }
}

t.test('each route takes its body as its config.body says', async (t) => {
  const gateway = await app(t)
  t.same(await post(gateway, '/value', 'application/json', '{ "a": 1 }'), { status: 200, body: { body: { a: 1 } } }, 'by default, a JSON body is its value')
  t.same(await post(gateway, '/value', 'text/plain', 'as is'), { status: 200, body: { body: 'as is' } }, 'and text/plain its text')
  t.same(await post(gateway, '/text', 'application/json', '{ "a": 1 }'), { status: 200, body: { body: '{ "a": 1 }' } }, "json: 'text' keeps the JSON text as sent")
  t.same(await post(gateway, '/batch', 'application/json', '{"events": [{"data": { "n": 1e400 }}]}'), { status: 200, body: { payloads: ['{"n":1e400}'] } }, 'capture keeps the text of each data')
  t.match(await post(gateway, '/batch', 'text/plain', '{"events": []}'), { status: 415, body: { code: 'GW_UNSUPPORTED_MEDIA_TYPE' } }, 'text: false refuses text/plain')
})

t.test('every route: UTF-8 only, and the JSON rules of parseJsonBody', async (t) => {
  const gateway = await app(t)
  for (const url of ['/value', '/text']) {
    t.match(await post(gateway, url, 'text/plain; charset=iso-8859-1', 'caf\u00e9'), { status: 415, body: { code: 'GW_UNSUPPORTED_MEDIA_TYPE' } }, `${url}: another charset`)
    t.match(await post(gateway, url, 'application/json', Buffer.from([0x22, 0xff, 0x22])), { status: 400, body: { message: 'the body is not valid UTF-8' } }, `${url}: bytes that are not UTF-8`)
    t.match(await post(gateway, url, 'application/json', '{"__proto__": {}}'), { status: 400, body: { code: 'GW_BAD_REQUEST' } }, `${url}: a prototype key`)
  }
  t.same(await post(gateway, '/text', 'application/json; charset="UTF-8"', '"\ufeffx"'), { status: 200, body: { body: '"\ufeffx"' } }, 'charset utf-8 is fine, a BOM kept as sent')
})
