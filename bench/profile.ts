// `node --import tsx bench/profile.ts FILE.cpuprofile [N]`: where a CPU
// profile's time went, by function (self time) and by file.
import { readFileSync } from 'node:fs'

interface ProfileNode {
  id: number
  callFrame: { functionName: string, url: string, lineNumber: number }
  hitCount?: number
  children?: number[]
}

const file = process.argv[2]
if (file === undefined) throw new Error('usage: profile.ts FILE.cpuprofile [N]')
const top = Number(process.argv[3] ?? 25)
const profile = JSON.parse(readFileSync(file, 'utf8')) as { nodes: ProfileNode[], samples: number[], timeDeltas: number[] }
const byNode = new Map<number, ProfileNode>(profile.nodes.map((n) => [n.id, n]))
const selfUs = new Map<number, number>()
for (let i = 0; i < profile.samples.length; i++) {
  const id = profile.samples[i] as number
  selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0))
}
const total = [...selfUs.values()].reduce((a, b) => a + b, 0)
const byFunction = new Map<string, number>()
const byFile = new Map<string, number>()
for (const [id, us] of selfUs) {
  const { functionName, url, lineNumber } = (byNode.get(id) as ProfileNode).callFrame
  const where = url.replace(/^file:\/\/.*?\/(node_modules|dist)\//, '$1/').replace(/^node:/, 'node:')
  const key = `${functionName === '' ? '(anonymous)' : functionName} ${where === '' ? '' : `${where}:${lineNumber + 1}`}`
  byFunction.set(key, (byFunction.get(key) ?? 0) + us)
  const fileKey = where === '' ? functionName : where.replace(/^(node_modules\/(@[^/]+\/)?[^/]+).*/, '$1')
  byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + us)
}
const show = (title: string, map: Map<string, number>): void => {
  process.stdout.write(`${title} (of ${(total / 1e6).toFixed(1)} s sampled)\n`)
  for (const [key, us] of [...map].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    process.stdout.write(`${(100 * us / total).toFixed(1).padStart(5)}%  ${key}\n`)
  }
}
show('self time by function', byFunction)
show('\nself time by file or package', byFile)
