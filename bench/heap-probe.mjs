// Preloaded into the gateway by the bench (`node --expose-gc --import
// ./bench/heap-probe.mjs dist/server.js`): on a message over the IPC
// channel it collects garbage and answers with process.memoryUsage(), or
// writes a heap snapshot to the path it is sent. Nothing of it is in the
// gateway itself.
import { writeHeapSnapshot } from 'node:v8'

if (process.send !== undefined) {
  process.channel?.unref()
  process.on('message', (message) => {
    const gc = globalThis.gc
    if (typeof gc === 'function') {
      gc()
      gc()
    }
    if (message?.type === 'snapshot') writeHeapSnapshot(message.path)
    process.send?.({ type: 'memory', ...process.memoryUsage() })
  })
}
