// The operator view: GET /status/stream, drawn as tiles and small charts.
// Opened as /status.html#access_token=TOKEN (what `npm start` prints) or
// with a token typed into its form. The token stays in this page's memory:
// the fragment never reaches a server, is dropped from the address bar at
// once, and each connection trades the token for a single-use operator
// ticket (POST /status/tickets), so no URL ever carries the token.
const $ = (id) => document.getElementById(id)
const tokenInput = $('token')
const stateView = $('state')
const WINDOW_MS = 5 * 60 * 1000
const MIN_SPAN_MS = 15 * 1000
const SVG = 'http://www.w3.org/2000/svg'

for (const params of [new URLSearchParams(location.hash.slice(1)), new URLSearchParams(location.search)]) {
  if (params.has('access_token')) tokenInput.value = params.get('access_token')
}
if (location.hash !== '' || location.search !== '') history.replaceState(null, '', location.pathname)

/** Points of the charts, oldest first: {at, published, delivered, streams, eventLoopLagMs}. */
let points = []
let source = null
let retryTimer = null
let attempts = 0

function setState (text, state = text) {
  stateView.textContent = text
  stateView.dataset.state = state
}

const integer = new Intl.NumberFormat('en', { maximumFractionDigits: 0 })
const decimal = new Intl.NumberFormat('en', { maximumFractionDigits: 1 })
const rate = (value) => value === null ? '–' : decimal.format(value)

function show (id, text, level) {
  const element = $(id)
  element.textContent = text
  if (level !== undefined) element.dataset.level = level
}

function showSample (sample) {
  show('streams', integer.format(sample.streams))
  show('channels', integer.format(sample.channels.listened))
  show('published-rate', rate(sample.rates.published))
  show('published-total', integer.format(sample.totals.published))
  show('delivered-rate', rate(sample.rates.delivered))
  show('delivered-total', integer.format(sample.totals.delivered))
  show('listener-state', sample.listener.state, sample.listener.state === 'live' ? 'ok' : 'bad')
  show('listener-reconnects', integer.format(sample.listener.reconnects))
  const inUse = sample.pool.total - sample.pool.idle
  show('pool', `${inUse} / ${sample.pool.max}`, sample.pool.waiting > 0 ? 'warn' : 'ok')
  show('pool-waiting', integer.format(sample.pool.waiting))
  const queue = sample.notifyQueueUsage
  show('notify-queue', `${decimal.format(queue * 100)} %`, queue > 0.5 ? 'bad' : queue > 0.1 ? 'warn' : 'ok')
  const lag = sample.eventLoopLagMs
  show('lag', lag < 0 ? '–' : `${decimal.format(lag)} ms`, lag > 200 ? 'bad' : lag > 50 ? 'warn' : 'ok')
  show('cut-offs', integer.format(sample.totals.cutOffs), sample.totals.cutOffs > 0 ? 'warn' : 'ok')
  $('updated').textContent = `· ${new Date(sample.at).toLocaleTimeString()}`

  const rows = sample.channels.top.map(({ name, subscribers }) => {
    const row = document.createElement('tr')
    const [channel, count] = [document.createElement('td'), document.createElement('td')]
    channel.textContent = name
    count.textContent = integer.format(subscribers)
    row.append(channel, count)
    return row
  })
  $('channel-rows').replaceChildren(...rows)
}

function addPoint (point) {
  // The sample that opened the stream may be in its history too.
  if (points.length > 0 && point.at <= points.at(-1).at) return
  points.push(point)
  const oldest = point.at - WINDOW_MS
  while (points.length > 0 && points[0].at < oldest) points.shift()
}

/** The smallest of 1, 2, 5 × 10^n at or above `value`: a round top for an axis. */
function roundTop (value) {
  if (!(value > 0)) return 1
  const magnitude = 10 ** Math.floor(Math.log10(value))
  return [1, 2, 5, 10].map((m) => m * magnitude).find((top) => top >= value)
}

/**
 * Draws lines of `series` ([{key, className}]) over the last five minutes
 * (or since the first point, at least 15 s) into an SVG of viewBox 300×80: time left to right, 0 to a round top
 * bottom to top. A sample without a value (the first after a pause) breaks
 * the line.
 */
function drawChart (id, series, unit = '') {
  const svg = $(id)
  const now = points.at(-1)?.at ?? Date.now()
  // The last five minutes, or what there is of them (at least 15 s).
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - (points[0]?.at ?? now)))
  const values = series.flatMap(({ key }) => points.map((p) => p[key]).filter((v) => v !== null && v >= 0))
  const top = roundTop(Math.max(0, ...values))
  const x = (at) => (300 * (at - (now - span)) / span).toFixed(1)
  const y = (v) => (78 - 76 * v / top).toFixed(1)
  const children = [20, 40, 60].map((level) => {
    const line = document.createElementNS(SVG, 'line')
    for (const [name, value] of Object.entries({ x1: 0, x2: 300, y1: level, y2: level, class: 'grid' })) line.setAttribute(name, value)
    return line
  })
  for (const { key, className } of series) {
    let d = ''
    let pen = 'M'
    for (const point of points) {
      const value = point[key]
      if (value === null || value < 0) { pen = 'M'; continue }
      d += `${pen}${x(point.at)},${y(value)}`
      pen = 'L'
    }
    const path = document.createElementNS(SVG, 'path')
    path.setAttribute('d', d)
    path.setAttribute('class', className)
    path.dataset.points = String(points.filter((p) => p[key] !== null && p[key] >= 0).length)
    children.push(path)
  }
  svg.replaceChildren(...children)
  $(`${id}-max`).textContent = `scale 0 to ${decimal.format(top)}${unit}`
  $(`${id}-span`).textContent = `−${span >= 120_000 ? `${Math.round(span / 60_000)} min` : `${Math.round(span / 1000)} s`}`
}

function drawCharts () {
  drawChart('chart-rates', [{ key: 'published', className: 'published' }, { key: 'delivered', className: 'delivered' }])
  drawChart('chart-streams', [{ key: 'streams', className: 'streams' }])
  drawChart('chart-lag', [{ key: 'eventLoopLagMs', className: 'lag' }], ' ms')
}

async function ticket () {
  const response = await fetch('/status/tickets', { method: 'POST', headers: { authorization: `Bearer ${tokenInput.value}` } })
  const body = await response.json()
  if (!response.ok) throw Object.assign(new Error(body.message), { status: response.status })
  return body.ticket
}

function reconnectLater () {
  source?.close()
  source = null
  setState('reconnecting')
  clearTimeout(retryTimer)
  // Backoff with jitter, up to 10 s; each attempt needs a fresh ticket.
  const delay = Math.min(10_000, 250 * 2 ** attempts++) * (0.5 + Math.random() / 2)
  retryTimer = setTimeout(open, delay)
}

async function open () {
  let url
  try {
    url = new URL('/status/stream', location.origin)
    url.searchParams.set('access_token', await ticket())
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      $('connect-panel').hidden = false
      return setState(`refused: ${err.message}`, 'closed')
    }
    return reconnectLater()
  }
  source = new EventSource(url)
  source.onopen = () => {
    attempts = 0
    setState('open')
    $('connect-panel').hidden = true
  }
  source.onerror = () => reconnectLater()
  source.addEventListener('status/history', (message) => {
    points = []
    for (const point of JSON.parse(message.data)) addPoint(point)
    drawCharts()
  })
  source.addEventListener('status', (message) => {
    const sample = JSON.parse(message.data)
    showSample(sample)
    addPoint({ at: sample.at, published: sample.rates.published, delivered: sample.rates.delivered, streams: sample.streams, eventLoopLagMs: sample.eventLoopLagMs })
    drawCharts()
  })
  source.addEventListener('gateway/expired', () => {
    source.close()
    source = null
    $('connect-panel').hidden = false
    setState('token expired: connect with a fresh one', 'closed')
  })
}

function connect () {
  source?.close()
  clearTimeout(retryTimer)
  attempts = 0
  if (!tokenInput.value) return setState('closed')
  setState('connecting')
  open()
}

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault()
  connect()
})

drawCharts()
connect()
