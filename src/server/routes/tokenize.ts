/** The tokenizer over HTTP: POST /tokenize (TGI's shape), POST /detokenize (vLLM's shape). */
import type { FastifyInstance } from 'fastify';
import type { AppDeps } from '../app.ts';
import { checkTokenIds } from './common.ts';
import { DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, type DetokenizeRequestBody, type TokenizeRequestBody } from '../schemas.ts';

export function tokenizeRoutes(app: FastifyInstance, deps: AppDeps): void {
  app.post<{ Body: TokenizeRequestBody }>('/tokenize', {
    schema: { summary: 'The tokens of a text, each with the piece of the text it covers (TGI)', body: TokenizeRequest, response: { 200: TokenizeResponse } },
    config: { doc: { tag: 'TGI' } },
  }, async (request) => deps.tokenizer.pieces(request.body.inputs, { addSpecialTokens: request.body.add_special_tokens ?? true }));

  app.post<{ Body: DetokenizeRequestBody }>('/detokenize', {
    schema: { summary: 'The text of token ids (vLLM)', body: DetokenizeRequest, response: { 200: DetokenizeResponse } },
    config: { doc: { tag: 'TGI' } },
  }, async (request) => {
    const { tokens } = request.body;
    checkTokenIds(deps, tokens, 'tokens');
    return { prompt: deps.tokenizer.decode(tokens, { skipSpecialTokens: request.body.skip_special_tokens ?? false }) };
  });
}
