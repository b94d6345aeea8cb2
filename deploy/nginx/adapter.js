// The adapter a request names, as the key of `hash $lora_adapter consistent` (nginx.conf): the OpenAI routes'
// `model`, TGI's `parameters.adapter_id` or LoRAX's top-level `adapter_id`; '' when the body names none or is
// not JSON. r.requestText is the body only while it is held in memory (client_body_buffer_size in nginx.conf);
// a body spilled to a temp file reads as empty here.
function key(r) {
    var text = r.requestText;
    if (!text) return '';
    var body;
    try {
        body = JSON.parse(text);
    } catch (e) {
        return '';
    }
    if (body === null || typeof body !== 'object') return '';
    var candidates = [body.model, body.parameters && body.parameters.adapter_id, body.adapter_id];
    for (var i = 0; i < candidates.length; i++) {
        if (typeof candidates[i] === 'string' && candidates[i] !== '') return candidates[i];
    }
    return '';
}

export default { key };
