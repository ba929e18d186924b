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
$('publish-channel').value = params.getAll('channel')[0] ?? ''

let source = null
let listened = []

function setState (state) {
  stateView.textContent = state
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

function connect () {
  source?.close()
  listened = channelList()
  if (listened.length === 0) return setState('closed')
  const url = new URL('/events', location.origin)
  for (const channel of listened) url.searchParams.append('channel', channel)
  if (tokenInput.value) url.searchParams.set('access_token', tokenInput.value)
  setState('connecting')
  source = new EventSource(url)
  source.onopen = () => setState('open')
  source.onerror = () => setState(source.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting')
  // Each channel arrives as its own event type.
  for (const channel of listened) source.addEventListener(channel, (message) => showEvent(channel, message))
  // The gateway's own events: where the stream (re)started, and what was lost.
  source.addEventListener('gateway/open', (message) => {
    const { lastEventId, head } = JSON.parse(message.data)
    streamStartView.textContent = lastEventId === head ? `· live from id ${head}` : `· resumed after id ${lastEventId}`
  })
  for (const name of ['gateway/missed', 'gateway/gap']) {
    source.addEventListener(name, (message) => showEvent(name, message))
  }
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
