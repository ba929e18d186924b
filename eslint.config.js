import neostandard from 'neostandard'

export default [
  ...neostandard({ ts: true, ignores: ['dist', 'coverage', '.data', '.tap', 'node_modules'] }),
  {
    files: ['public/**/*.js'],
    languageOptions: { globals: { location: 'readonly', EventSource: 'readonly', document: 'readonly', fetch: 'readonly', URL: 'readonly', URLSearchParams: 'readonly', history: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly' } }
  }
]
