// A chat's first question, sent to the app while it is typed (app.py, `accept_draft`): the app
// embeds it then, and when Enter is pressed retrieval finds the vector ready instead of spending
// ~10-15 ms on it between Enter and the first answer token. Only before the chat's first
// question: a follow-up is rewritten with the conversation first, so its draft would be wasted.
// Nothing leaves this computer: the app is the page's own server.
(() => {
  const QUIET_MS = 50; // after the last keystroke (a typist's next key comes 100-250 ms later)
  const MAX_CHARS = 1000; // the app ignores longer drafts
  const url = new URL("../rag/draft", document.currentScript ? document.currentScript.src : location.href);
  let timer = 0;
  document.addEventListener(
    "input",
    (event) => {
      const box = event.target;
      if (!(box instanceof HTMLTextAreaElement) || box.id !== "chat-input") return;
      clearTimeout(timer);
      timer = setTimeout(() => {
        const text = box.value.trim();
        if (!text || text.length > MAX_CHARS) return;
        if (document.querySelector('[data-step-type="user_message"]')) return; // not the first question
        fetch(url, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ text }),
          credentials: "same-origin",
        }).catch(() => {}); // an optimisation: the question is embedded on arrival anyway
      }, QUIET_MS);
    },
    true,
  );
})();
