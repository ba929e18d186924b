// Worker threads do not inherit the tsx loader on Node 20: register it here.
import { register } from 'tsx/esm/api'

register()
await import('./subscriber.ts')
