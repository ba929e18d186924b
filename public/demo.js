// The demo page: a plain EventSource client of the gateway. Opened as
// /?channel=NAME&access_token=TOKEN it subscribes at once.
const params = new URLSearchParams(location.search)
const $ = (id) => document.getElementById(id)
const channelsInput = $('channels')
const tokenInput = $('token')
const stateView = $('state')
const lastIdView = $('last-id')
const streamStartView = $('stream-start')
const eventsBody = $('events')

channelsInput.value = params.getAll('channel').join(', ')
tokenInput.value = params.get('access_token') ?? ''
// Keep the token out of the address bar and the history from here on.
if (params.has('access_token')) {
  params.delete('access_token')
  history.replaceState(null, '', `${location.pathname}?${params}`)
}
$('publish-channel').value = params.getAll('channel')[0] ?? ''

let source = null
let listened = []

function setState (text, state = text) {
  stateView.textContent = text
  stateView.dataset.state = state
}

function channelList () {
  return channelsInput.value.split(',').map((c) => c.trim()).filter(Boolean)
}

function showEvent (channel, message) {
  const row = document.createElement('tr')
  let data = message.data
  try { data = JSON.stringify(JSON.parse(data), null, 2) } catch {}
  const [time, name, id] = ['td', 'td', 'td'].map((tag) => document.createElement(tag))
  time.textContent = new Date().toLocaleTimeString()
  const badge = document.createElement('span')
  badge.textContent = channel
  name.append(badge)
  id.textContent = message.lastEventId || '-'
  row.append(time, name, id)
  if (channel.startsWith('gateway/')) row.className = 'gateway'
  const cell = document.createElement('td')
  const pre = document.createElement('pre')
  pre.textContent = data
  cell.append(pre)
  row.append(cell)
  row.dataset.channel = channel
  eventsBody.prepend(row)
  if (message.lastEventId) lastIdView.textContent = `· last id ${message.lastEventId}`
}

// The token never goes into the stream's URL, where URLs are logged: each
// connection trades it for a single-use ticket (POST /tickets). A ticket is
// spent once used, so the page reconnects by itself rather than leave it to
// EventSource: with a fresh ticket and the last id it saw, so nothing is lost.
let lastEventId = null
let retryTimer = null
let attempts = 0

async function openUrl () {
  const url = new URL('/events', location.origin)
  for (const channel of listened) url.searchParams.append('channel', channel)
  if (lastEventId !== null) url.searchParams.set('lastEventId', lastEventId)
  if (!tokenInput.value) return url
  const response = await fetch('/tickets', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${tokenInput.value}` },
    body: JSON.stringify({ channels: listened })
  })
  const body = await response.json()
  if (!response.ok) throw Object.assign(new Error(body.message), { status: response.status })
  url.searchParams.set('access_token', body.ticket)
  return url
}

function reconnectLater () {
  source?.close()
  source = null
  setState('reconnecting')
  clearTimeout(retryTimer)
  // Backoff with jitter, up to 10 s.
  const delay = Math.min(10_000, 250 * 2 ** attempts++) * (0.5 + Math.random() / 2)
  retryTimer = setTimeout(open, delay)
}

async function open () {
  let url
  try {
    url = await openUrl()
  } catch (err) {
    // 401/403: the token will not do; anything else: the gateway is away.
    if (err.status === 401 || err.status === 403) return setState(`refused: ${err.message}`, 'closed')
    return reconnectLater()
  }
  source = new EventSource(url)
  source.onopen = () => { attempts = 0; setState('open') }
  source.onerror = () => reconnectLater()
  const remember = (message) => { if (message.lastEventId) lastEventId = message.lastEventId }
  // Each channel arrives as its own event type.
  for (const channel of listened) {
    source.addEventListener(channel, (message) => { remember(message); showEvent(channel, message) })
  }
  // The gateway's own events: where the stream (re)started, and what was lost.
  source.addEventListener('gateway/open', (message) => {
    remember(message)
    const { lastEventId: start, head } = JSON.parse(message.data)
    streamStartView.textContent = start === head ? `· live from id ${head}` : `· resumed after id ${start}`
  })
  for (const name of ['gateway/missed', 'gateway/gap', 'gateway/expired', 'gateway/unavailable']) {
    source.addEventListener(name, (message) => showEvent(name, message))
  }
}

function connect () {
  source?.close()
  clearTimeout(retryTimer)
  listened = channelList()
  lastEventId = null
  attempts = 0
  if (listened.length === 0) return setState('closed')
  setState('connecting')
  open()
}

$('subscribe-form').addEventListener('submit', (e) => {
  e.preventDefault()
  connect()
})

$('publish-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  const channel = $('publish-channel').value.trim()
  const payload = $('payload').value
  let contentType = 'text/plain'
  try { JSON.parse(payload); contentType = 'application/json' } catch {}
  const response = await fetch(`/channels/${encodeURIComponent(channel)}`, {
    method: 'POST',
    headers: { 'content-type': contentType, authorization: `Bearer ${tokenInput.value}` },
    body: payload
  })
  const body = await response.json()
  $('publish-result').textContent = response.ok ? `published id ${body.id}` : `${response.status}: ${body.message}`
})

if (listened.length === 0 && channelList().length > 0) connect()
