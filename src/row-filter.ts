import type { EventSelector } from './hub.js'

/*
 * Row filters: which events of its channels a stream takes, in the syntax
 * PostgREST and Supabase use, `column=op.value`:
 *
 *   status=eq.shipped   total=gte.100   region=in.(eu,"us,east")   note=is.null
 *
 * Several filters are ANDed. A filter tests the row of a row-change event
 * (sse_gateway.capture_changes: `new`, or `old` for a DELETE), or the
 * top-level fields of any other JSON object payload; a payload that is not
 * a JSON object matches no filter. Values compare by the field's JSON type:
 * a number numerically (the filter's value must be a number), a string as
 * text, by Unicode code point (as COLLATE "C" would), a boolean with `true`
 * or `false`. A null or absent field matches only `is.null`; an object or
 * array field matches nothing but `is`.
 *
 * Two kinds of event concern rows a filter cannot see, and pass every
 * filter so that no client misses them: a TRUNCATE (it removes every row),
 * and, for a filter on a column it lacks, a row sent truncated (too large:
 * its event carries only its primary key).
 *
 * Hand-written: a parser of a few dozen lines for a fixed grammar, with no
 * regular expression on the input but one anchored, backtracking-free
 * number pattern.
 */

export const FILTER_OPERATORS = ['eq', 'neq', 'lt', 'lte', 'gt', 'gte', 'in', 'is'] as const
export type FilterOperator = typeof FILTER_OPERATORS[number]

/** The filters one stream may have. */
export const MAX_FILTERS = 16
/** The longest filter, in characters. */
export const MAX_FILTER_LENGTH = 1024

const FILTER_SYNTAX = 'column=op.value, op one of eq, neq, lt, lte, gt, gte, in.(a,b,c), is.null, is.true, is.false'

/** One parsed filter. `values` holds one value, or the list of `in`. */
export interface RowFilter {
  readonly column: string
  readonly operator: FilterOperator
  readonly values: readonly string[]
}

/** A filter that does not parse; the message names it and says why. */
export class RowFilterError extends Error {
  override name = 'RowFilterError'
}

function refuse (text: string, why: string): never {
  const shown = text.length > 100 ? `${text.slice(0, 100)}…` : text
  throw new RowFilterError(`invalid filter ${JSON.stringify(shown)}: ${why}; use ${FILTER_SYNTAX}`)
}

/** Reads `in`'s list, `(a,b,"c,d")`: a value in double quotes may hold commas, parentheses and `\"` or `\\`. */
function parseList (text: string, list: string): string[] {
  if (!list.startsWith('(') || !list.endsWith(')') || list.length < 2) refuse(text, 'in takes a list in parentheses, in.(a,b,c)')
  const values: string[] = []
  let i = 1
  const end = list.length - 1
  if (i === end) refuse(text, 'in takes at least one value')
  for (;;) {
    let value = ''
    if (list[i] === '"') {
      i++
      while (i < end && list[i] !== '"') {
        if (list[i] === '\\' && i + 1 < end) i++
        value += list[i]
        i++
      }
      if (i >= end) refuse(text, 'a quoted value is not closed')
      i++
      if (i < end && list[i] !== ',') refuse(text, 'a quoted value must be followed by a comma or the closing parenthesis')
    } else {
      const comma = list.indexOf(',', i)
      const stop = comma === -1 || comma > end ? end : comma
      value = list.slice(i, stop)
      i = stop
    }
    values.push(value)
    if (i >= end) return values
    i++ // the comma
  }
}

/** Parses one `column=op.value`; throws RowFilterError naming it. */
export function parseRowFilter (text: string): RowFilter {
  if (text.length > MAX_FILTER_LENGTH) refuse(text, `longer than ${MAX_FILTER_LENGTH} characters`)
  const equals = text.indexOf('=')
  if (equals <= 0) refuse(text, 'no column')
  const column = text.slice(0, equals)
  const rest = text.slice(equals + 1)
  const dot = rest.indexOf('.')
  if (dot === -1) refuse(text, 'no operator')
  const operator = rest.slice(0, dot)
  const value = rest.slice(dot + 1)
  if (!(FILTER_OPERATORS as readonly string[]).includes(operator)) refuse(text, `unknown operator ${JSON.stringify(operator)}`)
  if (operator === 'in') return { column, operator, values: parseList(text, value) }
  if (operator === 'is' && value !== 'null' && value !== 'true' && value !== 'false') refuse(text, 'is takes null, true or false')
  return { column, operator: operator as FilterOperator, values: [value] }
}

// A JSON number as text: no backtracking (each part is a run of one class).
const NUMBER = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$/

function numberOf (text: string): number | undefined {
  return NUMBER.test(text) ? Number(text) : undefined
}

/** Compares strings by Unicode code point, as PostgreSQL's "C" collation does on UTF-8: -1, 0 or 1. */
function compareCodePoints (a: string, b: string): number {
  const length = Math.min(a.length, b.length)
  for (let i = 0; i < length; i++) {
    const x = a.codePointAt(i) as number
    const y = b.codePointAt(i) as number
    if (x !== y) return x < y ? -1 : 1
    if (x > 0xffff) i++
  }
  return a.length === b.length ? 0 : a.length < b.length ? -1 : 1
}

/** The order of a field's value against a filter's: -1, 0, 1, or undefined when they do not compare. */
function compare (field: unknown, value: string): number | undefined {
  if (typeof field === 'number') {
    const n = numberOf(value)
    return n === undefined ? undefined : Math.sign(field - n)
  }
  if (typeof field === 'string') return compareCodePoints(field, value)
  if (typeof field === 'boolean') return value === 'true' || value === 'false' ? Number(field) - Number(value === 'true') : undefined
  return undefined
}

const ABSENT = Symbol('absent')

function test (filter: RowFilter, field: unknown): boolean {
  const { operator, values } = filter
  if (operator === 'is') {
    const value = values[0]
    return value === 'null' ? field === null || field === ABSENT : field === (value === 'true')
  }
  if (field === null || field === ABSENT) return false
  if (operator === 'in') return values.some((v) => compare(field, v) === 0)
  const order = compare(field, values[0] as string)
  if (order === undefined) return false
  switch (operator) {
    case 'eq': return order === 0
    case 'neq': return order !== 0
    case 'lt': return order < 0
    case 'lte': return order <= 0
    case 'gt': return order > 0
    default: return order >= 0
  }
}

const ROW_OPERATIONS = new Set(['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'])

function isObject (value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

/**
 * A stream's filters, ANDed. `key` is the same for the same set of filters
 * in any order: streams with equal keys share one evaluation per event.
 */
export class RowFilters {
  readonly filters: readonly RowFilter[]
  readonly key: string

  constructor (filters: readonly RowFilter[]) {
    const unique = new Map(filters.map((f) => [JSON.stringify([f.column, f.operator, f.values]), f]))
    const keys = [...unique.keys()].sort()
    this.filters = keys.map((k) => unique.get(k) as RowFilter)
    this.key = keys.join('&')
  }

  /** Parses a stream's `filter` parameters; throws RowFilterError naming the first bad one. */
  static parse (texts: readonly string[]): RowFilters {
    if (texts.length > MAX_FILTERS) throw new RowFilterError(`a stream may have at most ${MAX_FILTERS} filters`)
    return new RowFilters(texts.map(parseRowFilter))
  }

  /** Whether a payload (parsed JSON; undefined when it is not JSON) passes every filter. */
  matches (payload: unknown): boolean {
    if (!isObject(payload)) return false
    let row: unknown = payload
    let truncated = false
    const op = payload.op
    if (typeof op === 'string' && ROW_OPERATIONS.has(op) && typeof payload.schema === 'string' && typeof payload.table === 'string') {
      if (op === 'TRUNCATE') return true
      row = op === 'DELETE' ? payload.old : payload.new
      truncated = payload.truncated === true
    }
    if (!isObject(row)) return false
    for (const filter of this.filters) {
      const present = Object.hasOwn(row, filter.column)
      if (!present && truncated) continue
      if (!test(filter, present ? row[filter.column] : ABSENT)) return false
    }
    return true
  }
}

/** The selector of a filtered stream: the events that pass, framed as on any channel stream. */
export function filterSelector (filters: RowFilters): EventSelector {
  return {
    key: `filter:${filters.key}`,
    select: (view) => filters.matches(view.json()) ? view.channelFrame() : undefined
  }
}
