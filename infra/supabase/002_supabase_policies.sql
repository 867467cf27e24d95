-- KoroKoro 002: Supabase-only row-level security and storage policies.
-- Apply after 001_products_queue.sql, on a Supabase database (schema `storage`, roles anon,
-- authenticated, service_role). Idempotent. On plain PostgreSQL it stops at the first check.
--
-- Access after this file:
--   anon / authenticated  SELECT rows of public.products whose status is DONE; nothing else;
--                         read objects under models/<unique_id>/ of DONE products; no writes;
--                         may not call the queue functions.
--   service_role          everything (workers use this key; it also bypasses RLS on Supabase).
-- The bucket id is korokoro_bucket (conf/storage/*.yaml `bucket`): change it below if yours differs.

BEGIN;

DO $$
BEGIN
    IF to_regclass('storage.objects') IS NULL OR to_regclass('storage.buckets') IS NULL
       OR to_regprocedure('storage.foldername(text)') IS NULL
       OR (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) < 3 THEN
        RAISE EXCEPTION '002_supabase_policies.sql needs a Supabase database (schema storage, roles anon, authenticated, service_role)'
            USING HINT = 'on plain PostgreSQL apply only 001_products_queue.sql';
    END IF;
    IF to_regprocedure('public.claim_next_product(text, interval, integer)') IS NULL THEN
        RAISE EXCEPTION 'apply 001_products_queue.sql first';
    END IF;
END $$;

-- products: everyone reads finished products; only the service role changes rows.
ALTER TABLE public.products ENABLE ROW LEVEL SECURITY;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.products FROM anon, authenticated;
GRANT SELECT ON public.products TO anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.products TO service_role;

DROP POLICY IF EXISTS "korokoro: anyone reads finished products" ON public.products;
CREATE POLICY "korokoro: anyone reads finished products" ON public.products
    FOR SELECT TO anon, authenticated
    USING (status = 'DONE');

DROP POLICY IF EXISTS "korokoro: service role manages products" ON public.products;
CREATE POLICY "korokoro: service role manages products" ON public.products
    FOR ALL TO service_role
    USING (true) WITH CHECK (true);

-- Policies are OR-ed: a seed policy such as "anon may do anything" would undo the above.
DO $$
DECLARE
    pol record;
BEGIN
    FOR pol IN SELECT policyname, cmd, roles FROM pg_policies
               WHERE schemaname = 'public' AND tablename = 'products' AND policyname NOT LIKE 'korokoro: %' LOOP
        RAISE WARNING 'public.products also has policy "%" (% for %): it still applies; drop it if it lets anon write',
            pol.policyname, pol.cmd, pol.roles;
    END LOOP;
END $$;

-- Queue functions: Supabase grants EXECUTE on new public functions to anon and authenticated
-- by default privileges, so revoking from PUBLIC (001) is not enough.
REVOKE ALL ON FUNCTION public.claim_next_product(text, interval, integer) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.claim_product(text, text, interval) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.enqueue_product(text, text, text, text) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.mark_product_done(text, text) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.mark_product_failed(text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.claim_next_product(text, interval, integer) TO service_role;
GRANT EXECUTE ON FUNCTION public.claim_product(text, text, interval) TO service_role;
GRANT EXECUTE ON FUNCTION public.enqueue_product(text, text, text, text) TO service_role;
GRANT EXECUTE ON FUNCTION public.mark_product_done(text, text) TO service_role;
GRANT EXECUTE ON FUNCTION public.mark_product_failed(text, text) TO service_role;

-- The bucket: private, so its objects are readable only as the policies below allow (a
-- public bucket serves every object, videos and half-uploaded models included, to anyone).
INSERT INTO storage.buckets (id, name, public)
VALUES ('korokoro_bucket', 'korokoro_bucket', false)
ON CONFLICT (id) DO NOTHING;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM storage.buckets WHERE id = 'korokoro_bucket' AND public) THEN
        RAISE WARNING 'bucket korokoro_bucket is public: anyone can read every object in it, whatever the policies say'
            USING HINT = 'UPDATE storage.buckets SET public = false WHERE id = ''korokoro_bucket''; (the front end must then download with the anon key or signed URLs)';
    END IF;
END $$;

-- Anyone reads models/<unique_id>/... once that product is DONE (the manifest is uploaded last
-- and the row marked DONE after it, so a reader never sees a half-published model).
DROP POLICY IF EXISTS "korokoro: anyone reads models of finished products" ON storage.objects;
CREATE POLICY "korokoro: anyone reads models of finished products" ON storage.objects
    FOR SELECT TO anon, authenticated
    USING (
        bucket_id = 'korokoro_bucket'
        AND (storage.foldername(objects.name))[1] = 'models'
        AND EXISTS (
            SELECT 1 FROM public.products AS p
            WHERE p.unique_id = (storage.foldername(objects.name))[2]
              AND p.status = 'DONE'
        )
    );

-- Only the service role writes (and reads everything in) the bucket.
DROP POLICY IF EXISTS "korokoro: service role manages the bucket" ON storage.objects;
CREATE POLICY "korokoro: service role manages the bucket" ON storage.objects
    FOR ALL TO service_role
    USING (bucket_id = 'korokoro_bucket') WITH CHECK (bucket_id = 'korokoro_bucket');

-- Seller uploads from a browser need a policy of their own (not enabled here), e.g. signed-in
-- users writing under uploads/<their user id>/:
-- CREATE POLICY "korokoro: sellers upload their videos" ON storage.objects
--     FOR INSERT TO authenticated
--     WITH CHECK (bucket_id = 'korokoro_bucket'
--                 AND (storage.foldername(name))[1] = 'uploads'
--                 AND (storage.foldername(name))[2] = (SELECT auth.uid())::text);

COMMIT;
