import t from 'tap'
import { compactJson, JsonTextError, scanJson } from '../src/json-text.js'
import { seededRandom } from './helper.js'

const BATCH = { list: 'events', member: 'data' }

t.test('compacting removes the whitespace between tokens and nothing in strings', async (t) => {
  const random = seededRandom(Number(process.env.FUZZ_SEED ?? 11))
  const pieces = ['a b', ' ', '\\', '"', '\\"', '\n', '\t', 'é', '{', ']', ',', ':']
  const value = (depth: number): unknown => {
    const r = random()
    if (depth > 3 || r < 0.3) return Array.from({ length: Math.floor(random() * 4) }, () => pieces[Math.floor(random() * pieces.length)]).join('')
    if (r < 0.45) return random() * 1e6
    if (r < 0.7) return Array.from({ length: Math.floor(random() * 4) }, () => value(depth + 1))
    return Object.fromEntries(Array.from({ length: Math.floor(random() * 4) }, (_, i) => [`k ${i}"\\`, value(depth + 1)]))
  }
  for (let i = 0; i < 500; i++) {
    const v = value(0)
    const pretty = JSON.stringify(v, null, i % 2 === 0 ? 2 : '\t')
    t.equal(compactJson(pretty, 0, pretty.length), JSON.stringify(v), `case ${i}`)
  }
})

t.test('captures each list[i].member as JSON.parse reads it: escaped keys, the last of repeated keys', async (t) => {
  const scan = (text: string): Array<string | undefined> => scanJson(text, 128, BATCH).captured
  t.same(scan('{"events":[{"data":1},{"x":{"data":2}},{"data":[ 3 , "4\\\\"]}]}'), ['1', undefined, '[3,"4\\\\"]'])
  t.same(scan('{"events":[{"data":1}],"events":[{"d\\u0061ta":5,"data":6}]}'), ['6'], 'the last events, the last data')
  t.same(scan('{"other":{"events":[{"data":1}]},"events":[{"channel":"a\\"}","data":{"k":"v"}}]}'), ['{"k":"v"}'], 'only at the top')
  t.same(scan('[{"events":[{"data":1}]}]'), [], 'a top-level array has no events')
})

t.test('refuses deep nesting and prototype keys, in one pass with no recursion', async (t) => {
  t.throws(() => scanJson('['.repeat(100_000) + ']'.repeat(100_000), 128), JsonTextError)
  t.doesNotThrow(() => scanJson('['.repeat(128) + ']'.repeat(128), 128))
  t.throws(() => scanJson('['.repeat(129) + ']'.repeat(129), 128), /deeper than 128/)
  t.throws(() => scanJson('{"a":{"\\u005f_proto__":1}}', 128), /__proto__/)
  t.throws(() => scanJson('{"constructor":{"prototype":1}}', 128), /constructor\.prototype/)
  t.doesNotThrow(() => scanJson('{"constructor":[{"prototype":1}],"x":"__proto__"}', 128), 'only an object under constructor, and only keys')
})
