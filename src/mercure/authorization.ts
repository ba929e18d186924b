import { createVerifier } from 'fast-jwt'
import type { JwtAlgorithm } from '../config.js'
import type { CompiledSelector, TopicMatcher, TopicSelector } from './topic-selector.js'

/*
 * Who may publish which topics, and who may read which private updates, from
 * a Mercure token of either generation:
 *
 * - draft-07 ("legacy"): a JWT with a `mercure` claim, `{publish: [selectors],
 *   subscribe: [selectors], payload}`, the selectors being topic selectors
 *   of the draft (`*`, a topic, a URI template);
 * - Mercure 1.0: an access token (`typ: at+jwt`, RFC 9068) whose
 *   `authorization_details` (RFC 9396) hold entries of the type
 *   MERCURE_DETAIL_TYPE: `{actions: ["publish" | "subscribe"], topics:
 *   [{match, match_type?: "exact" | "urlpattern"}], payload?}`. One entry
 *   that does not parse makes the whole token invalid.
 */

export const MERCURE_DETAIL_TYPE = 'https://mercure.rocks/authorization-detail'

/** A token that is missing a part, fails verification, or holds grants that do not parse: 401 `invalid_token`. */
export class InvalidTokenError extends Error {
  override name = 'InvalidTokenError'
}

/** What a subscribe grant attaches to the subscriptions it covers (Mercure's payloads). */
export interface PayloadGrant {
  selectors: readonly CompiledSelector[]
  payload: unknown
}

/** What a verified token allows. */
export interface MercureGrants {
  generation: 'legacy' | '1.0'
  /** Topics it may publish (every topic of an update must match one). */
  publish: readonly CompiledSelector[]
  /** Topics whose private updates it may read (one topic of an update must match one). */
  subscribe: readonly CompiledSelector[]
  /** In order: the first whose selectors match a subscription gives its payload. */
  payloads: readonly PayloadGrant[]
}

/** A token no one presented: public updates only, and no publishing. */
export const ANONYMOUS: MercureGrants = { generation: 'legacy', publish: [], subscribe: [], payloads: [] }

export interface VerifiedToken {
  grants: MercureGrants
  /** Epoch seconds, when the token has an `exp`. */
  exp: number | undefined
}

// Bounds on what one token may hold (Mercure 1.0 asks hubs for such limits).
const MAX_DETAILS = 100
const MAX_TOPICS_PER_DETAIL = 100

function compileAll (matcher: TopicMatcher, selectors: readonly TopicSelector[]): CompiledSelector[] {
  try {
    return selectors.map((s) => matcher.compile(s))
  } catch {
    throw new InvalidTokenError('the token holds a topic selector that is not valid')
  }
}

function legacyGrants (claim: unknown, matcher: TopicMatcher): MercureGrants {
  if (typeof claim !== 'object' || claim === null) return ANONYMOUS
  const { publish, subscribe, payload } = claim as Record<string, unknown>
  const selectors = (list: unknown): TopicSelector[] => Array.isArray(list)
    ? list.filter((s): s is string => typeof s === 'string').slice(0, MAX_DETAILS * MAX_TOPICS_PER_DETAIL).map((value) => ({ type: 'legacy', value }))
    : []
  const subscribeSelectors = compileAll(matcher, selectors(subscribe))
  return {
    generation: 'legacy',
    publish: compileAll(matcher, selectors(publish)),
    subscribe: subscribeSelectors,
    // The draft's payload is the token's, whatever the subscription.
    payloads: payload === undefined ? [] : [{ selectors: [matcher.compile({ type: 'legacy', value: '*' })], payload }]
  }
}

function modernGrants (details: unknown, matcher: TopicMatcher): MercureGrants {
  const grants = { generation: '1.0' as const, publish: [] as CompiledSelector[], subscribe: [] as CompiledSelector[], payloads: [] as PayloadGrant[] }
  if (details === undefined) return grants
  if (!Array.isArray(details)) throw new InvalidTokenError('authorization_details must be an array')
  const mercure = details.filter((d) => typeof d === 'object' && d !== null && (d as { type?: unknown }).type === MERCURE_DETAIL_TYPE)
  if (mercure.length > MAX_DETAILS) throw new InvalidTokenError(`a token may hold at most ${MAX_DETAILS} Mercure authorization details`)
  for (const detail of mercure as Array<Record<string, unknown>>) {
    const { actions, topics, payload } = detail
    if (!Array.isArray(actions) || actions.length === 0 || !actions.every((a) => typeof a === 'string')) {
      throw new InvalidTokenError('a Mercure authorization detail needs a non-empty array of actions')
    }
    if (!Array.isArray(topics) || topics.length === 0 || topics.length > MAX_TOPICS_PER_DETAIL) {
      throw new InvalidTokenError(`a Mercure authorization detail needs 1 to ${MAX_TOPICS_PER_DETAIL} topics`)
    }
    const selectors = compileAll(matcher, topics.map((topic: unknown): TopicSelector => {
      if (typeof topic !== 'object' || topic === null) throw new InvalidTokenError('each topic of an authorization detail must be an object')
      const { match, match_type: matchType = 'exact' } = topic as Record<string, unknown>
      if (typeof match !== 'string' || (matchType !== 'exact' && matchType !== 'urlpattern')) {
        throw new InvalidTokenError('each topic of an authorization detail needs a match, and a match_type of exact or urlpattern')
      }
      return { type: matchType, value: match }
    }))
    // Actions the hub does not know are ignored, as Mercure 1.0 says.
    if (actions.includes('publish')) grants.publish.push(...selectors)
    if (actions.includes('subscribe')) {
      grants.subscribe.push(...selectors)
      if (payload !== undefined) grants.payloads.push({ selectors, payload })
    }
  }
  return grants
}

/**
 * The grants of verified claims. A token is read as Mercure 1.0 when its
 * header says `typ: at+jwt` or its claims have `authorization_details`,
 * else as draft-07 (`mercure` claim). Throws InvalidTokenError.
 */
export function grantsOf (header: Record<string, unknown>, claims: Record<string, unknown>, matcher: TopicMatcher): MercureGrants {
  const typ = typeof header.typ === 'string' ? header.typ.toLowerCase().replace(/^application\//, '') : undefined
  if (typ === 'at+jwt' || claims.authorization_details !== undefined) return modernGrants(claims.authorization_details, matcher)
  return legacyGrants(claims.mercure, matcher)
}

/** Whether the grants allow publishing the update: every topic must match a publish selector. */
export function mayPublish (matcher: TopicMatcher, grants: MercureGrants, topics: readonly string[]): boolean {
  return topics.every((topic) => matcher.matchesAny(grants.publish, [topic]))
}

/** Whether the grants allow reading a private update: one of its topics must match a subscribe selector. */
export function mayRead (matcher: TopicMatcher, grants: MercureGrants, topics: readonly string[]): boolean {
  return matcher.matchesAny(grants.subscribe, topics)
}

/** The payload the grants attach to a subscription (its selector taken as a topic), if any. */
export function payloadFor (grants: MercureGrants, selector: string): unknown {
  return grants.payloads.find((grant) => grant.selectors.some((s) => s.matches(selector)))?.payload
}

export interface MercureTokenOptions {
  algorithm: JwtAlgorithm
  /** The key publishers' tokens are verified with: an HS256 secret, or a PEM public key. */
  publisherKey: string
  /** The key subscribers' tokens are verified with. */
  subscriberKey: string
  /** When set, a token's `aud` must hold it. */
  audience?: string | undefined
  /** When set, a token's `iss` must be it. */
  issuer?: string | undefined
  /** Whether a token without `exp` is refused (JWT_REQUIRE_EXP; draft-07 tokens often have none). */
  requireExp: boolean
  clockToleranceSeconds: number
}

/** Verifies Mercure tokens (signature, times, `aud` and `iss` when configured) and reads their grants. */
export class MercureTokens {
  readonly #verify: Record<'publish' | 'subscribe', (token: string) => { header: Record<string, unknown>, payload: Record<string, unknown> }>
  readonly #matcher: TopicMatcher

  constructor (options: MercureTokenOptions, matcher: TopicMatcher) {
    this.#matcher = matcher
    const verifier = (key: string): (token: string) => { header: Record<string, unknown>, payload: Record<string, unknown> } => createVerifier({
      key,
      algorithms: [options.algorithm],
      complete: true,
      // EventSource reconnects with the same token: verify it once.
      cache: 1000,
      clockTolerance: options.clockToleranceSeconds * 1000,
      requiredClaims: [...(options.requireExp ? ['exp'] : []), ...(options.audience !== undefined ? ['aud'] : []), ...(options.issuer !== undefined ? ['iss'] : [])],
      ...(options.audience !== undefined ? { allowedAud: options.audience } : {}),
      ...(options.issuer !== undefined ? { allowedIss: options.issuer } : {})
    }) as (token: string) => { header: Record<string, unknown>, payload: Record<string, unknown> }
    this.#verify = { publish: verifier(options.publisherKey), subscribe: verifier(options.subscriberKey) }
  }

  /** Verifies a token for a role and reads its grants; throws InvalidTokenError (never saying why, as RFC 6750 advises). */
  verify (token: string, role: 'publish' | 'subscribe'): VerifiedToken {
    let verified
    try {
      verified = this.#verify[role](token)
    } catch {
      throw new InvalidTokenError('the token is invalid')
    }
    const { exp } = verified.payload
    if (exp !== undefined && !(typeof exp === 'number' && Number.isFinite(exp))) throw new InvalidTokenError('the token is invalid')
    return {
      grants: grantsOf(verified.header, verified.payload, this.#matcher),
      exp: typeof exp === 'number' ? Math.floor(exp) : undefined
    }
  }
}
