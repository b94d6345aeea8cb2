/**
 * Lingering close, as nginx's `lingering_close`. When a response goes out before the client has sent all of its
 * request body (a body refused for its size) and the connection is then closed, closing at once resets the
 * connection while the client is still writing, and the client's TCP stack drops the response it has not read yet:
 * the client sees a failed connection instead of the coded 413. So the server ends its side after the response and
 * reads and discards what the client still sends, until the client closes, for a bounded time and size.
 */
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';

export interface LingerLimits {
  /** Longest time a closing connection is read for. */
  readonly totalMs: number;
  /** Longest silence from the client before the connection is closed. */
  readonly idleMs: number;
  /** Most bytes read and discarded. */
  readonly bytes: number;
}

export const LINGER: LingerLimits = { totalMs: 30_000, idleMs: 5_000, bytes: 256 * 2 ** 20 };

const lingering = new WeakSet<Socket>();

/**
 * Makes the connection of `req` linger when Node closes it after the response (it calls `destroySoon` for a
 * response with `Connection: close`). Nothing changes for a request whose body was read in full.
 */
export function lingerOnClose(req: IncomingMessage, limits: LingerLimits = LINGER): void {
  const socket = req.socket as Socket & { destroySoon?: () => void };
  if (req.complete || lingering.has(socket)) return;
  lingering.add(socket);
  socket.destroySoon = () => {
    let bytes = 0;
    const close = () => {
      clearTimeout(total);
      clearTimeout(idle);
      socket.destroy();
    };
    const total = setTimeout(close, limits.totalMs);
    const idle = setTimeout(close, limits.idleMs);
    socket.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > limits.bytes) close();
      else idle.refresh();
    });
    socket.once('end', close);
    socket.once('error', close);
    socket.once('close', close);
    socket.end(); // the response is out: half-close, the client may go on sending
    socket.resume();
  };
}
