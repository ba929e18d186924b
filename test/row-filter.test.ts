import t from 'tap'
import { ChannelHub, type EventSink, LazyEventView } from '../src/hub.js'
import { filterSelector, MAX_FILTER_LENGTH, MAX_FILTERS, parseRowFilter, RowFilterError, RowFilters } from '../src/row-filter.js'

const change = (op: string, row: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  op,
  schema: 'public',
  table: 'orders',
  ...(op === 'DELETE' ? { old: row } : { new: row }),
  ...(op === 'UPDATE' ? { old: { ...row, status: 'before' } } : {}),
  ...extra
})

const passes = (filters: string[], payload: unknown): boolean => RowFilters.parse(filters).matches(payload)

t.test('parse: column=op.value', async (t) => {
  t.same(parseRowFilter('status=eq.shipped'), { column: 'status', operator: 'eq', values: ['shipped'] })
  t.same(parseRowFilter('total=gte.100'), { column: 'total', operator: 'gte', values: ['100'] })
  t.same(parseRowFilter('note=eq.'), { column: 'note', operator: 'eq', values: [''] }, 'an empty value')
  t.same(parseRowFilter('url=eq.a=b.c'), { column: 'url', operator: 'eq', values: ['a=b.c'] }, 'the value is everything after the operator')
  t.same(parseRowFilter('region=in.(eu,us,"a,b","q\\"uote",)'), { column: 'region', operator: 'in', values: ['eu', 'us', 'a,b', 'q"uote', ''] }, 'in: quoted values may hold commas and escaped quotes')
  t.same(parseRowFilter('x=in.("(paren)")'), { column: 'x', operator: 'in', values: ['(paren)'] })
  for (const v of ['null', 'true', 'false']) t.same(parseRowFilter(`x=is.${v}`), { column: 'x', operator: 'is', values: [v] })
})

t.test('parse: a malformed filter is refused, naming it and why', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['status', /no column/],
    ['=eq.x', /no column/],
    ['status=shipped', /no operator/],
    ['status=like.x%', /unknown operator "like"/],
    ['status=EQ.x', /unknown operator "EQ"/],
    ['x=in.a,b', /in takes a list/],
    ['x=in.(a,b', /in takes a list/],
    ['x=in.()', /at least one value/],
    ['x=in.("open)', /not closed/],
    ['x=in.("a"b)', /comma or the closing/],
    ['x=is.maybe', /is takes null, true or false/],
    ['x=eq.' + 'y'.repeat(MAX_FILTER_LENGTH), /longer than/]
  ]
  for (const [text, why] of cases) {
    t.throws(() => parseRowFilter(text), RowFilterError, text)
    try {
      parseRowFilter(text)
    } catch (err) {
      t.match((err as Error).message, why, `${text}: says why`)
      t.match((err as Error).message, text.length > 100 ? /invalid filter "x=eq\.y+…"/ : `invalid filter ${JSON.stringify(text)}`, `${text}: names it`)
    }
  }
  t.throws(() => RowFilters.parse(Array.from({ length: MAX_FILTERS + 1 }, (_, i) => `c${i}=eq.1`)), /at most 16 filters/)
})

t.test('the key: the same filters in any order, repeated or not, share it', async (t) => {
  const a = RowFilters.parse(['status=eq.shipped', 'total=gte.100'])
  const b = RowFilters.parse(['total=gte.100', 'status=eq.shipped', 'total=gte.100'])
  t.equal(a.key, b.key)
  t.not(a.key, RowFilters.parse(['status=eq.shipped']).key)
  t.not(RowFilters.parse(['x=in.(a,b)']).key, RowFilters.parse(['x=in.("a,b")']).key, 'lists that differ have different keys')
  t.equal(filterSelector(a).key, filterSelector(b).key)
  t.not(filterSelector(a).key, '', 'never the key of unfiltered streams')
})

t.test('eq and neq, by the field\'s JSON type', async (t) => {
  const row = { status: 'shipped', total: 100, paid: true, price: 9.5, code: '007', big: 1e21, meta: { a: 1 }, tags: ['x'] }
  const p = change('INSERT', row)
  t.ok(passes(['status=eq.shipped'], p))
  t.notOk(passes(['status=eq.Shipped'], p), 'text is case-sensitive')
  t.ok(passes(['total=eq.100'], p))
  t.ok(passes(['total=eq.100.0'], p), 'numbers compare as numbers')
  t.ok(passes(['total=eq.1e2'], p))
  t.notOk(passes(['total=eq.abc'], p), 'a value that is no number never equals a number')
  t.notOk(passes(['total=eq. 100'], p), 'nor one with spaces')
  t.ok(passes(['code=eq.007'], p), 'a string field compares as text')
  t.notOk(passes(['code=eq.7'], p))
  t.ok(passes(['price=eq.9.5'], p))
  t.ok(passes(['big=eq.1e21'], p))
  t.ok(passes(['paid=eq.true'], p))
  t.notOk(passes(['paid=eq.1'], p), 'booleans take true or false')
  t.notOk(passes(['meta=eq.{"a":1}'], p), 'an object field matches no comparison')
  t.notOk(passes(['tags=eq.x'], p), 'nor an array field')
  t.ok(passes(['status=neq.new'], p))
  t.notOk(passes(['status=neq.shipped'], p))
  t.ok(passes(['total=neq.99'], p))
})

t.test('lt, lte, gt, gte: numbers numerically, text by code point', async (t) => {
  const p = change('INSERT', { total: 100, name: 'b', when: '2026-11-30T10:00:00+00:00', emoji: '😀', paid: false })
  t.ok(passes(['total=gt.99'], p))
  t.notOk(passes(['total=gt.100'], p))
  t.ok(passes(['total=gte.100'], p))
  t.ok(passes(['total=lt.100.5'], p))
  t.notOk(passes(['total=lt.100'], p))
  t.ok(passes(['total=lte.100'], p))
  t.ok(passes(['total=gt.-1'], p))
  t.ok(passes(['total=gt.9'], p), '100 > 9 as numbers, not as text')
  t.ok(passes(['name=gt.a', 'name=lt.c'], p))
  t.ok(passes(['name=gt.B'], p), 'code points: "b" after "B"')
  t.ok(passes(['when=gte.2026-11-30', 'when=lt.2026-12-01'], p), 'ISO timestamps order as text')
  t.ok(passes(['emoji=gt.\uffff'], p), 'a character beyond U+FFFF sorts after U+FFFF, by code point, not UTF-16 unit')
  t.ok(passes(['paid=lt.true'], p), 'false before true')
  t.notOk(passes(['total=gt.many'], p), 'no order between a number and a word')
})

t.test('in and is', async (t) => {
  const p = change('INSERT', { region: 'us,east', n: 3, note: null, paid: true })
  t.ok(passes(['region=in.(eu,"us,east")'], p))
  t.notOk(passes(['region=in.(eu,us,east)'], p))
  t.ok(passes(['n=in.(1,2,3)'], p))
  t.notOk(passes(['n=in.(4,5)'], p))
  t.ok(passes(['note=is.null'], p))
  t.ok(passes(['missing=is.null'], p), 'an absent field is null')
  t.notOk(passes(['n=is.null'], p))
  t.ok(passes(['paid=is.true'], p))
  t.notOk(passes(['paid=is.false'], p))
  t.notOk(passes(['note=is.false'], p))
  for (const op of ['eq.x', 'neq.x', 'lt.x', 'gte.x', 'in.(x)']) {
    t.notOk(passes([`note=${op}`], p), `null matches no ${op}`)
    t.notOk(passes([`missing=${op}`], p), `an absent field matches no ${op}`)
  }
})

t.test('several filters are ANDed', async (t) => {
  const p = change('INSERT', { status: 'shipped', total: 150 })
  t.ok(passes(['status=eq.shipped', 'total=gte.100'], p))
  t.notOk(passes(['status=eq.shipped', 'total=gte.200'], p))
  t.ok(passes([], p), 'no filter: every JSON object')
})

t.test('which row a row-change event is tested on', async (t) => {
  t.ok(passes(['status=eq.new'], change('INSERT', { status: 'new' })), 'INSERT: new')
  t.ok(passes(['status=eq.now'], change('UPDATE', { status: 'now' })), 'UPDATE: new')
  t.notOk(passes(['status=eq.before'], change('UPDATE', { status: 'now' })), 'UPDATE: not old')
  t.ok(passes(['status=eq.gone'], change('DELETE', { status: 'gone' })), 'DELETE: old')
  t.notOk(passes(['op=eq.INSERT'], change('INSERT', { status: 'new' })), 'the envelope is not the row')
  t.ok(passes(['status=eq.x', 'total=gt.1'], { op: 'TRUNCATE', schema: 'public', table: 'orders' }), 'TRUNCATE concerns every row: it passes')
  const truncated = { op: 'UPDATE', schema: 'public', table: 'orders', truncated: true, new: { id: 7 }, old: { id: 7 } }
  t.ok(passes(['status=eq.shipped'], truncated), 'a truncated row passes a filter on a column it lacks')
  t.ok(passes(['id=eq.7', 'status=eq.shipped'], truncated), 'and is tested on its key')
  t.notOk(passes(['id=eq.8'], truncated))
  t.notOk(passes(['status=eq.x'], { op: 'INSERT', schema: 'public', table: 'orders' }), 'a row-change event without its row matches nothing')
})

t.test('any other JSON object is tested on its top-level fields; anything else matches nothing', async (t) => {
  t.ok(passes(['kind=eq.alert', 'level=gte.3'], { kind: 'alert', level: 4, nested: { kind: 'x' } }))
  t.notOk(passes(['kind=eq.x'], { nested: { kind: 'x' } }), 'only top-level fields')
  t.ok(passes(['op=eq.BUY'], { op: 'BUY', schema: 'public', table: 't' }), 'an op that is no row operation: a plain object')
  for (const payload of [undefined, null, 'text', 42, true, [{ kind: 'alert' }]]) {
    t.notOk(passes([], payload), `${JSON.stringify(payload)} matches no filter`)
  }
  t.ok(passes(['toString=is.null', 'constructor=is.null'], JSON.parse('{}')), 'what an object inherits is absent')
  t.notOk(passes(['constructor=eq.1'], Object.create({ constructor: 1 }) as object), 'an inherited field is not a field')
})

t.test('the selector: one evaluation per event view, the channel frame when it passes', async (t) => {
  const selector = filterSelector(RowFilters.parse(['status=eq.shipped']))
  const view = new LazyEventView({ id: 5, channel: 'public.orders', data: JSON.stringify(change('INSERT', { status: 'shipped' })) })
  const frame = selector.select(view)
  t.equal(frame, view.channelFrame(), 'the shared channel frame, not a copy')
  t.match(frame?.toString(), /^id: 5\nevent: public\.orders\ndata: \{/)
  t.equal(selector.select(new LazyEventView({ id: 6, channel: 'public.orders', data: JSON.stringify(change('INSERT', { status: 'new' })) })), undefined)
  t.equal(selector.select(new LazyEventView({ id: 7, channel: 'public.orders', data: 'not json' })), undefined)
})

t.test('through the hub: streams with the same filters share one evaluation and one buffer per event', async (t) => {
  class CountingFilters extends RowFilters {
    evaluations = 0
    override matches (payload: unknown): boolean {
      this.evaluations++
      return super.matches(payload)
    }
  }
  const hub = new ChannelHub({ listen: async () => {}, unlisten: async () => {} })
  const made: CountingFilters[] = []
  const written: Array<{ stream: string, frame: Buffer }> = []
  const subscribe = async (stream: string, filters: string[]): Promise<void> => {
    const counting = new CountingFilters(filters.map(parseRowFilter))
    made.push(counting)
    const sink: EventSink = { write: (frame) => { written.push({ stream, frame }) } }
    await hub.subscribe(['public.orders'], sink, filterSelector(counting))
  }
  // Five streams, two filter sets (the same filters in another order are the same set).
  await subscribe('a1', ['status=eq.shipped', 'total=gte.100'])
  await subscribe('a2', ['total=gte.100', 'status=eq.shipped'])
  await subscribe('a3', ['status=eq.shipped', 'total=gte.100'])
  await subscribe('b1', ['status=neq.new'])
  await subscribe('b2', ['status=neq.new'])
  const delivered = hub.deliver({ id: 9, channel: 'public.orders', data: JSON.stringify(change('INSERT', { status: 'shipped', total: 120 })) })
  t.equal(delivered, 5)
  t.same(written.map((w) => w.stream).sort(), ['a1', 'a2', 'a3', 'b1', 'b2'])
  t.ok(written.every((w) => w.frame === written[0]?.frame), 'one framed buffer for every stream')
  t.equal(made.reduce((n, f) => n + f.evaluations, 0), 2, 'one evaluation per filter set, not per stream')
  written.length = 0
  hub.deliver({ id: 10, channel: 'public.orders', data: JSON.stringify(change('INSERT', { status: 'shipped', total: 50 })) })
  t.same(written.map((w) => w.stream).sort(), ['b1', 'b2'], 'a row that passes one set only')
})
