// The type every dashboard in ../dashboards must satisfy: Grafana's own `Dashboard` (schema v1,
// the JSON model a file-provisioned dashboard uses) from @grafana/schema, with two adjustments
// that keep it faithful to what Grafana accepts from a JSON file:
//
// 1. Enum-typed fields (ThresholdsMode, FieldColorModeId, MappingType, ...) are declared as
//    TypeScript string enums, which a plain string literal never satisfies. `AsJson` maps every
//    string enum to the union of its values, so "absolute" is accepted and "absolut" is not.
//    Numeric enums are left as they are (TypeScript checks a number literal against their members).
// 2. Grafana's CUE schema leaves AnnotationQuery open (`...`) so that datasources may keep their
//    own fields next to the base ones; the generated TypeScript closes it. We reopen it for exactly
//    the Prometheus annotation fields, and nothing else.
import type { AnnotationQuery, Dashboard } from '@grafana/schema';

type AsJson<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<AsJson<U>>
      : T extends object
        ? { [K in keyof T]: AsJson<T[K]> }
        : T;

/** Fields the Prometheus datasource reads from an annotation query next to `target`. */
interface PrometheusAnnotationFields {
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

export type CheckedDashboard = AsJson<Omit<Dashboard, 'annotations'>> & {
  annotations?: {
    list?: Array<AsJson<AnnotationQuery> & PrometheusAnnotationFields>;
  };
};
