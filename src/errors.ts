import createError from '@fastify/error'

// Errors the gateway answers with on purpose. Fastify's error handler turns
// them into {statusCode, code, error, message}; their messages are written
// for the client and never carry secrets, SQL or internal state.
export const InvalidChannelError = createError('GW_INVALID_CHANNEL', '%s', 400)
export const BadRequestError = createError('GW_BAD_REQUEST', '%s', 400)
export const UnauthorizedError = createError('GW_UNAUTHORIZED', '%s', 401)
export const ForbiddenError = createError('GW_FORBIDDEN', '%s', 403)
export const ConflictError = createError('GW_CONFLICT', '%s', 409)
export const PayloadTooLargeError = createError('GW_PAYLOAD_TOO_LARGE', '%s', 413)
export const UnavailableError = createError('GW_UNAVAILABLE', '%s', 503)
export const UriTooLongError = createError('GW_URI_TOO_LONG', '%s', 414)
export const UnsupportedMediaTypeError = createError('GW_UNSUPPORTED_MEDIA_TYPE', '%s', 415)
export const TooManyRequestsError = createError('GW_TOO_MANY_REQUESTS', '%s', 429)

/** What @fastify/under-pressure throws (it constructs it without arguments). */
export class OverloadedError extends UnavailableError {
  constructor () {
    super('the gateway is overloaded: retry shortly')
  }
}
