// A failure the page explains to the shopper in its own words (shown as the page's message).
export class ViewerError extends Error {}
